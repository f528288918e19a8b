"""Engine.load with every file hashed (bundle format 2) vs rmt-deploy 0.1's load, ViT-B-16 on CPU.

Exports a random-weight ViT-B-16 shared bundle (2 tasks, 2.5% zeros), derives the 0.1
manifest for the same files, checks out rmt-deploy 0.1 (git commit `--baseline`) into a
temporary worktree and times Engine.load of both, interleaved, each in fresh processes
(warm page cache, as a service restart sees it). Writes benchmarks/results/load_integrity.json.

    .venv/bin/python benchmarks/load_integrity.py [--rounds 7] [--baseline da7f154]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from export import make_packs  # noqa: E402  (benchmarks/export.py)

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
TIMER = """
import json, sys, time, warnings
warnings.simplefilter("ignore")
from rmt_deploy.runtime.engine import Engine
times = []
for _ in range({loads}):
    start = time.perf_counter()
    engine = Engine.load(sys.argv[1], cache_tasks=1)
    times.append(time.perf_counter() - start)
    engine.close()
print(json.dumps(times))
"""


def _export(folder: Path) -> Path:
    import torch

    from rmt_deploy.export import ExportConfig, export_bundle

    paths = make_packs("ViT-B-16", 0, 0.025, folder)
    torch.manual_seed(0)
    export_bundle(ExportConfig("ViT-B-16", None, paths, folder / "bundle", mode="shared"), progress=True)
    return folder / "bundle"


def _legacy_copy(bundle: Path, folder: Path) -> Path:
    """The same files (hard links) under the 0.1 manifest: no file records, version 1."""
    legacy = folder / "bundle-0.1"
    shutil.copytree(bundle, legacy, copy_function=os.link)
    doc = json.loads((bundle / "manifest.json").read_text())
    for key in ("checksums", "quick_gelu"):
        doc.pop(key, None)
    doc["version"] = 1
    (legacy / "manifest.json").unlink()
    (legacy / "manifest.json").write_text(json.dumps(doc, indent=2))
    return legacy


def _time(source: Path, bundle: Path, loads: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(source)}
    out = subprocess.run([sys.executable, "-c", TIMER.format(loads=loads), str(bundle)], env=env, check=True,
                         capture_output=True, text=True, cwd=source).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--loads", type=int, default=3, help="loads per process; the first is dropped")
    parser.add_argument("--baseline", default="da7f154", help="git commit of rmt-deploy 0.1")
    parser.add_argument("--bundle", type=Path, default=None, help="reuse a format-2 ViT-B-16 bundle")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        bundle = args.bundle or _export(folder)
        legacy = _legacy_copy(bundle, folder)
        old_src = folder / "rmt-0.1"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old_src), args.baseline],
                       check=True, capture_output=True)
        try:
            samples = {"hashed": [], "baseline_0.1": []}
            for _ in range(args.rounds):  # interleaved
                samples["hashed"] += _time(REPO, bundle, args.loads)[1:]
                samples["baseline_0.1"] += _time(old_src, legacy, args.loads)[1:]
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old_src)], check=False)
        sizes = {p.name: p.stat().st_size for p in bundle.iterdir() if p.is_file()}
    medians = {k: statistics.median(v) for k, v in samples.items()}
    result = {
        "model": "ViT-B-16 (random weights), shared bundle, 2 tasks, ORT CPU",
        "bytes_hashed": sum(sizes.values()) + 0,
        "files": sizes,
        "load_s": {k: {"median": medians[k], "min": min(v), "max": max(v), "n": len(v)} for k, v in samples.items()},
        "ratio_hashed_vs_0.1": medians["hashed"] / medians["baseline_0.1"],
        "target": "<= 1.25",
        "method": f"{args.rounds} interleaved rounds x {args.loads - 1} timed loads per fresh process, warm cache",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "load_integrity.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
