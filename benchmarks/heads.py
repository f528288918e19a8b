"""Task heads on ViT-B-16 (random weights, CPU): predict latency and bytes per task for each head kind.

One shared bundle holds three tasks of 47 classes (DTD's size) on the same masks (2.5% zeros):
`zeroshot` (class-prompt text features), `coop` (learned-prompt text features: the same math)
and `tip-adapter` with a 16-shot cache (752 fp16 keys). Engine.predict is timed per task,
interleaved, at batch 1 and 8; the head alone (rmt_deploy.artifacts.heads on the embeddings) is timed
too, since its cost is far below the encoder's run-to-run noise. Target: tip-adapter predict
<= 1.05x zeroshot. Writes benchmarks/results/heads.{json,txt}.

    .venv/bin/python benchmarks/heads.py [--model ViT-B-16] [--repeats 15] [--threads 2] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from random_tasks import random_base, random_masks, random_pack, unit_rows  # benchmarks/random_tasks.py

RESULTS = Path(__file__).parent / "results"
CLASSES, SHOTS, ZEROS = 47, 16, 0.025
KINDS = ("zeroshot", "coop", "tip-adapter")
TARGET = 1.05


def prepare(model_name: str, work: Path) -> Path:
    """Random base, one mask set, three packs (one per head kind), a shared bundle."""
    bundle = work / "bundle"
    if (bundle / "manifest.json").is_file():
        return bundle
    from rmt_deploy.artifacts.heads import Cache
    from rmt_deploy.export import ExportConfig, export_bundle

    base = random_base(model_name, work)
    rng = np.random.default_rng(0)
    masks = random_masks(rng, base.shapes, ZEROS)
    dim = base.embed_dim
    paths = []
    for kind in KINDS:
        cache = None
        if kind == "tip-adapter":
            cache = Cache.build(unit_rows(rng, CLASSES * SHOTS, dim), np.repeat(np.arange(CLASSES), SHOTS), 1.17, 5.5,
                                CLASSES, dim)
        pack = random_pack(base, kind, rng, ZEROS, CLASSES, masks=masks, head_kind=kind, cache=cache)
        paths.append(pack.save(work / f"{kind}.rmtask"))
    export_bundle(ExportConfig(model_name, str(base.checkpoint), paths, bundle, mode="shared"), progress=True)
    return bundle


def _serving_head(path: Path):
    """The runtime's head of a task file, as the engine builds it."""
    from rmt_deploy.artifacts.task_file import TaskPack
    from rmt_deploy.runtime.task_reader import head_of

    pack = TaskPack.load(path)
    return head_of(pack.name, tuple(pack.class_names), pack.head, pack.logit_scale, pack.head_kind, pack.cache)


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def measure(bundle: Path, repeats: int, threads: int | None) -> dict:
    """Interleaved Engine.predict per head kind at batch 1 and 8, and the head alone."""
    from rmt_deploy.runtime.engine import Engine

    out: dict = {"predict_ms": {}, "paired_ratio": {}, "noise_ratio": {}, "min_ms": {}, "min_ratio": {},
                 "head_only_ms": {}}
    rng = np.random.default_rng(1)
    with Engine.load(bundle, cache_tasks=len(KINDS), threads=threads) as engine:
        heads = {kind: _serving_head(bundle / "tasks" / f"{kind}.rmtask") for kind in KINDS}  # timed alone too
        for batch in (1, 8):
            images = rng.standard_normal((batch, 3, *engine.bundle.manifest.preprocess.image_size)).astype(np.float32)
            for kind in KINDS:
                engine.predict(images, task=kind)  # warm-up, and makes every task resident
            runs = {kind: [] for kind in KINDS}
            for _ in range(repeats):
                for index in rng.permutation(len(KINDS)):  # a new order each round: no position bias
                    kind = KINDS[index]
                    runs[kind].append(_median_ms(lambda: engine.predict(images, task=kind), 1))
            out["predict_ms"][str(batch)] = {kind: float(np.median(v)) for kind, v in runs.items()}
            zeroshot = np.array(runs["zeroshot"])
            out["paired_ratio"][str(batch)] = float(np.median(np.array(runs["tip-adapter"]) / zeroshot))
            out["noise_ratio"][str(batch)] = float(np.median(np.array(runs["coop"]) / zeroshot))  # same math
            out["min_ms"][str(batch)] = {kind: float(np.min(v)) for kind, v in runs.items()}
            out["min_ratio"][str(batch)] = float(np.min(runs["tip-adapter"]) / np.min(zeroshot))
            embeddings = unit_rows(rng, batch, heads["zeroshot"].head.shape[1])
            maths = {kind: heads[kind].prepared() for kind in KINDS}  # as the engine keeps them for tasks in use
            out["head_only_ms"][str(batch)] = {
                kind: _median_ms(lambda: maths[kind].logits(embeddings), 200) for kind in KINDS}
        out["head_bytes"] = {kind: heads[kind].nbytes for kind in KINDS}
    out["task_file_bytes"] = {kind: (bundle / "tasks" / f"{kind}.rmtask").stat().st_size for kind in KINDS}
    return out


def report(result: dict) -> str:
    lines = [f"task heads: {result['model']} fp32 random weights, ONNX Runtime CPU, {result['threads']} threads, "
             f"{CLASSES} classes, {SHOTS}-shot cache ({result['machine']}; {result['load']})", "",
             f"{'predict median ms':<22}" + "".join(f"{k:>14}" for k in KINDS) + f"{'tip/zeroshot':>14}  target"]
    for batch, row in result["predict_ms"].items():
        ratio = result["paired_ratio"][batch]
        mark = "ok" if ratio <= TARGET else "MISS"
        lines.append(f"{'batch ' + batch:<22}" + "".join(f"{row[k]:>14.2f}" for k in KINDS)
                     + f"{ratio:>14.3f}  <= {TARGET} {mark}")
    noise = ", ".join(f"batch {b} {r:.3f}" for b, r in result["noise_ratio"].items())
    lines.append("(ratio: median over rounds of tip-adapter / zeroshot, each round in a new order; "
                 f"coop / zeroshot, the same math, is the noise: {noise})")
    for batch, row in result["min_ms"].items():
        lines.append(f"{'fastest, batch ' + batch:<22}" + "".join(f"{row[k]:>14.2f}" for k in KINDS)
                     + f"{result['min_ratio'][batch]:>14.3f}  (least disturbed run of each)")
    lines.append("")
    lines.append(f"{'head alone median ms':<22}" + "".join(f"{k:>14}" for k in KINDS))
    for batch, row in result["head_only_ms"].items():
        bound = result["head_bound_ratio"][batch]
        lines.append(f"{'batch ' + batch:<22}" + "".join(f"{row[k]:>14.4f}" for k in KINDS)
                     + f"   predict bound {bound:.5f}x")
    lines.append("(bound: 1 + (tip-adapter head - zeroshot head) / zeroshot predict: the head's own cost)")
    lines.append("")
    lines.append(f"{'bytes per task':<22}" + "".join(f"{k:>14}" for k in KINDS))
    lines.append(f"{'head':<22}" + "".join(f"{result['head_bytes'][k]:>14,}" for k in KINDS))
    lines.append(f"{'.rmtask file':<22}" + "".join(f"{result['task_file_bytes'][k]:>14,}" for k in KINDS))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the bundle here between runs")
    args = parser.parse_args()
    import onnxruntime

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        bundle = prepare(args.model, work)
        load = os.getloadavg()
        result = {"model": args.model, "threads": args.threads, "onnxruntime": onnxruntime.__version__,
                  "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                  "load": f"load average {load[0]:.1f} at start: the box is shared, figures are noisy",
                  "classes": CLASSES, "shots": SHOTS, "zeros": ZEROS, "repeats": args.repeats,
                  **measure(bundle, args.repeats, args.threads)}
    result["head_bound_ratio"] = {
        b: 1 + (h["tip-adapter"] - h["zeroshot"]) / result["predict_ms"][b]["zeroshot"]
        for b, h in result["head_only_ms"].items()}
    ratios = result["paired_ratio"]
    result["summary"] = {"tip_vs_zeroshot": ratios, "head_bound": result["head_bound_ratio"], "target": TARGET,
                         "ok": all(r <= TARGET for r in ratios.values())}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "heads.json").write_text(json.dumps(result, indent=2) + "\n")
    text = report(result)
    (RESULTS / "heads.txt").write_text(text + "\n")
    print(text)
    sys.exit(0)


if __name__ == "__main__":
    main()
