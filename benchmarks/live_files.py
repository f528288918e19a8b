"""What a live Engine's pristine base costs in memory, three ways, ViT-B-16 on CPU (ORT).

`mapped`: the base values as a read-only MAP_SHARED|MAP_POPULATE mapping of
base_weights.safetensors (rmt-deploy before issue #24: a truncated file kills the process with
SIGBUS). `private`: a private copy read at load (the pool's no-mapping path). `derived`: no
pristine copy at all; a new buffer is copied from a resident one and its zeroed entries are
restored from the ZeroSet's base values (what is built now). Each mode runs in a fresh process
with the same bundle: load (cache_tasks=2), predict with task 0, task 1 (a second buffer), task 2
(a rewrite), then reads VmRSS, RssAnon, RssFile and VmHWM from /proc/self/status.
Modes mapped and private run the pre-#24 code (`--baseline` commit, a temporary git worktree).

    .venv/bin/python benchmarks/live_files.py [--bundle DIR] [--baseline 73d423a] [--rounds 2]
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

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
PROBE = """
import json, sys, warnings
import numpy as np
warnings.simplefilter("ignore")
from rmt_deploy.runtime.engine import Engine
mode = sys.argv[2]
if mode == "private":
    from rmt_deploy.runtime.backends.onnxruntime import OrtBackend
    OrtBackend.map_base = lambda self: None
def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out
engine = Engine.load(sys.argv[1], cache_tasks=2, threads=2)
tasks = engine.tasks
steps = {"loaded": status()}
batch = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
for i, task in enumerate(tasks[:3]):
    engine.predict(batch, task=task)
    steps[f"after task {i}"] = status()
print(json.dumps(steps))
"""


def _export(folder: Path, tasks: int) -> Path:
    import numpy as np

    sys.path.insert(0, str(Path(__file__).parent))
    from random_tasks import random_base, random_pack

    from rmt_deploy.export import ExportConfig, export_bundle

    base = random_base("ViT-B-16", folder)
    paths = [random_pack(base, f"task{i}", np.random.default_rng(i), zeros=0.025, classes=47)
             .save(folder / f"task{i}.rmtask") for i in range(tasks)]
    export_bundle(ExportConfig("ViT-B-16", str(base.checkpoint), paths, folder / "bundle", mode="shared"),
                  progress=False)
    return folder / "bundle"


def _probe(source: Path, bundle: Path, mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(source)}
    out = subprocess.run([sys.executable, "-c", PROBE, str(bundle), mode], env=env, check=True,
                         capture_output=True, text=True, cwd=source).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None, help="reuse a ViT-B-16 shared bundle (>= 3 tasks)")
    parser.add_argument("--baseline", default="73d423a", help="git commit with the mapped base (before #24)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = args.bundle or _export(work, 3)
        old = work / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), args.baseline],
                       check=True, capture_output=True)
        try:
            runs: dict[str, list[dict]] = {"mapped": [], "private": [], "derived": []}
            for _ in range(args.rounds):
                runs["mapped"].append(_probe(old, bundle, "mapped"))
                runs["private"].append(_probe(old, bundle, "private"))
                runs["derived"].append(_probe(REPO, bundle, "derived"))
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], check=False)
            shutil.rmtree(old, ignore_errors=True)
        weights = (bundle / "base_weights.safetensors").stat().st_size
    summary = {mode: {step: {key: round(statistics.median(r[step][key] for r in rs), 1) for key in rs[0][step]}
                      for step in rs[0]} for mode, rs in runs.items()}
    result = {"model": "ViT-B-16 (random weights), shared bundle, 3 tasks (2.5% zeros), ORT CPU, 2 threads, "
                       "cache_tasks=2, batch 1",
              "base_weights_MiB": round(weights / 2**20, 1), "unit": "MiB (median of rounds)",
              "rounds": args.rounds, "modes": summary, "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "live_files.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
