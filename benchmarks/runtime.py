"""Runtime benchmark: task switching, latency and memory of the shared Engine vs folded sessions.

ViT-B-16 with random weights, fp32, ONNX Runtime on CPU, 8 tasks at the paper's sparsity.
Each memory figure comes from its own subprocess (peak RSS via ru_maxrss); timings are
medians, and latency alternates engine and plain-session runs. Writes
benchmarks/results/runtime.json and runtime.txt.

    .venv/bin/python benchmarks/runtime.py [--model ViT-B-16] [--zeros 0.025] [--threads 2]
        [--workdir DIR (keeps the bundle between runs)]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from random_tasks import random_bundle  # benchmarks/random_tasks.py
from small_model_overhead import settled  # benchmarks/small_model_overhead.py

from rmt_deploy.bench.memory import peak_rss_mb
from rmt_deploy.bench.sessions import folded_session

RESULTS = Path(__file__).parent / "results"
TASKS = [f"task{i}" for i in range(8)]
EXPORTED = TASKS[:2]  # folded models for these two; the other six are hot-added from .rmtask files
TARGETS = {
    "uncached_vs_floor": 1.5, "naive_vs_uncached": 50.0, "cached_ms": 1.0, "latency_ratio": 1.03,
    "rss_ratio": 1.5, "per_cached_task_vs_dense": 1.1,
}


# ---------------------------------------------------------------- preparation (needs torch)

def prepare(model_name: str, zeros: float, work: Path) -> Path:
    """Seeded random checkpoint, 8 task packs, a bundle (shared + folded for two tasks)."""
    return random_bundle(model_name, work, TASKS, zeros, lambda i: 10 + i, EXPORTED, mode="both", max_batch=8)


# ---------------------------------------------------------------- measurements (no torch)

def _median_ms(fn, repeats: int) -> float:
    from rmt_deploy.bench.timing import summarize_ms, time_call

    return summarize_ms([time_call(fn) for _ in range(repeats)])["p50"]


def _engine(work: Path, threads: int, cache_tasks: int):
    from rmt_deploy.runtime.engine import Engine

    engine = Engine.load(work / "bundle", task=TASKS[0], cache_tasks=cache_tasks, threads=threads)
    for name in TASKS:
        if name not in engine.tasks:
            engine.add_task(work / "tasks" / f"{name}.rmtask")
    return engine


def _images(batch: int) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((batch, 3, 224, 224)).astype(np.float32)


def measure_switch(work: Path, threads: int, repeats: int) -> dict:
    from rmt_deploy.artifacts.bundle import Bundle
    from rmt_deploy.artifacts.masks import decode_mask
    from rmt_deploy.artifacts.task_file import read_encoded
    from rmt_deploy.runtime.baseweights import SafetensorsReader

    engine = _engine(work, threads, cache_tasks=2)
    order = iter(TASKS * (repeats + 2))
    for _ in range(len(TASKS)):  # every slot now holds a task: each round-robin switch misses
        engine.switch(next(order))
    misses = engine.cache_stats["misses"]
    uncached = _median_ms(lambda: engine.switch(next(order)), repeats)
    assert engine.cache_stats["misses"] - misses == repeats, "round-robin switches must all miss"
    pair = iter([TASKS[0], TASKS[1]] * (repeats * 5 + 2))
    engine.switch(next(pair)), engine.switch(next(pair))
    cached = _median_ms(lambda: engine.switch(next(pair)), repeats * 5)
    stats = engine.store_stats  # every task is warm here: decoded zero indices
    task_bytes = (stats["warm_bytes"] + stats["cold_bytes"]) / len(TASKS)
    engine.close()

    bundle = Bundle.open(work / "bundle")
    reader = SafetensorsReader(bundle.root / bundle.manifest.base_weights)
    base, masks, bufs = {}, {}, {}
    blobs = read_encoded(work / "tasks" / f"{TASKS[3]}.rmtask").blobs
    for t in bundle.manifest.masked_tensors:
        base[t.name] = np.empty(t.shape, np.float32)
        reader.read_into(t.name, base[t.name])
        masks[t.name] = decode_mask(blobs[t.name])
        bufs[t.name] = np.empty_like(base[t.name])

    def floor():
        for name in base:
            np.multiply(base[name], masks[name], out=bufs[name])

    floor_ms = _median_ms(floor, repeats)
    dense = sum(b.nbytes for b in base.values())
    base.clear(), masks.clear(), bufs.clear()  # free ~2 dense copies before the naive session
    naive = _median_ms(lambda: folded_session(bundle, TASKS[1], threads), 5)
    return {"uncached_switch_ms": uncached, "cached_switch_ms": cached, "floor_ms": floor_ms,
            "naive_switch_ms": naive, "dense_masked_mb": dense / 2**20, "task_store_mb": task_bytes / 2**20}


def measure_latency(work: Path, threads: int, repeats: int) -> dict:
    from rmt_deploy.artifacts.bundle import Bundle

    engine = _engine(work, threads, cache_tasks=2)
    plain = folded_session(Bundle.open(work / "bundle"), TASKS[1], threads)
    out = {}
    for batch in (1, 8):
        images = _images(batch)
        np.testing.assert_allclose(settled(engine, images, TASKS[1]).predict(images, task=TASKS[1]).logits,
                                   plain.run(None, {"image": images})[0], rtol=1e-4, atol=1e-3)
        shared, folded = [], []
        for _ in range(repeats):  # interleaved, so both see the same machine load
            start = time.perf_counter()
            engine.predict(images, task=TASKS[1])
            shared.append(time.perf_counter() - start)
            start = time.perf_counter()
            plain.run(None, {"image": images})
            folded.append(time.perf_counter() - start)
        out[f"batch{batch}"] = {"engine_ms": float(np.median(shared) * 1e3),
                                "folded_ms": float(np.median(folded) * 1e3)}
        out[f"batch{batch}"]["ratio"] = out[f"batch{batch}"]["engine_ms"] / out[f"batch{batch}"]["folded_ms"]
    engine.close()
    return out


def measure_rss(work: Path, threads: int, what: str) -> dict:
    """Peak RSS of this process after one configuration ran a batch of 1 (run in a fresh process)."""
    images = _images(1)
    if what == "folded":
        from rmt_deploy.artifacts.bundle import Bundle

        session = folded_session(Bundle.open(work / "bundle"), TASKS[0], threads)
        session.run(None, {"image": images})
    else:
        cache_tasks = int(what.split("-")[1])
        engine = _engine(work, threads, cache_tasks)
        for name in TASKS[:cache_tasks] + TASKS[-1:]:
            engine.predict(images, task=name)
        assert len(engine.resident_tasks) == cache_tasks
    return {"peak_rss_mb": peak_rss_mb(), "torch_loaded": "torch" in sys.modules}


def measure_torch_cuda(work: Path, threads: int, repeats: int) -> dict:
    """torch backend on CUDA: uncached switch (host rewrite + one H2D copy) vs the H2D copy floor."""
    import torch

    from rmt_deploy.runtime.engine import Engine

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    engine = Engine.load(work / "bundle", task=TASKS[0], backend="torch", device="cuda", cache_tasks=2)
    for name in TASKS[len(EXPORTED):]:
        engine.add_task(work / "tasks" / f"{name}.rmtask")
    order = iter(TASKS * (repeats + 2))
    for _ in range(len(TASKS)):
        engine.switch(next(order))
    uncached = _median_ms(lambda: engine.switch(next(order)), repeats)
    arrays = [np.ones(s.shape, s.dtype) for s in engine._backend.specs]
    device = [torch.empty(a.shape, device="cuda") for a in arrays]

    def h2d():
        for d, a in zip(device, arrays):
            d.copy_(torch.from_numpy(a))
        torch.cuda.synchronize()

    floor = _median_ms(h2d, repeats)
    engine.close()
    return {"device": torch.cuda.get_device_name(0), "uncached_switch_ms": uncached, "h2d_floor_ms": floor,
            "ratio": uncached / floor}


def _child(work: Path, threads: int, what: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--workdir", str(work), "--threads", str(threads),
                             "--child", what], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"child {what} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- report

def summarise(r: dict) -> dict:
    s, lat, rss = r["switch"], r["latency"], r["rss"]
    per_task = (rss["engine-3"]["peak_rss_mb"] - rss["engine-1"]["peak_rss_mb"]) / 2
    figures = {
        "uncached_vs_floor": s["uncached_switch_ms"] / s["floor_ms"],
        "naive_vs_uncached": s["naive_switch_ms"] / s["uncached_switch_ms"],
        "cached_ms": s["cached_switch_ms"],
        "latency_ratio_b1": lat["batch1"]["ratio"],
        "latency_ratio_b8": lat["batch8"]["ratio"],
        "rss_ratio": rss["engine-1"]["peak_rss_mb"] / rss["folded"]["peak_rss_mb"],
        "per_cached_task_vs_dense": per_task / s["dense_masked_mb"],
    }
    checks = {
        "uncached_vs_floor": figures["uncached_vs_floor"] <= TARGETS["uncached_vs_floor"],
        "naive_vs_uncached": figures["naive_vs_uncached"] >= TARGETS["naive_vs_uncached"],
        "cached_ms": figures["cached_ms"] <= TARGETS["cached_ms"],
        "latency_ratio_b1": figures["latency_ratio_b1"] <= TARGETS["latency_ratio"],
        "latency_ratio_b8": figures["latency_ratio_b8"] <= TARGETS["latency_ratio"],
        "rss_ratio": figures["rss_ratio"] <= TARGETS["rss_ratio"],
        "per_cached_task_vs_dense": figures["per_cached_task_vs_dense"] <= TARGETS["per_cached_task_vs_dense"],
    }
    return {"figures": figures, "pass": checks, "per_cached_task_mb": per_task}


def text_report(r: dict) -> str:
    s, lat, rss, summary = r["switch"], r["latency"], r["rss"], r["summary"]
    f, ok = summary["figures"], summary["pass"]
    mark = lambda key: "ok" if ok[key] else "MISS"  # noqa: E731
    lines = [
        f"runtime benchmark: {r['model']} fp32, ONNX Runtime {r['onnxruntime']} CPU, {r['threads']} threads, "
        f"{len(TASKS)} tasks at {r['zeros']:.1%} zeros ({r['machine']})",
        "",
        "switching a task                         ms   target",
        f"  floor np.multiply(base, mask, out)  {s['floor_ms']:8.2f}",
        f"  uncached switch (in-place rewrite)  {s['uncached_switch_ms']:8.2f}   <= 1.5x floor: "
        f"{f['uncached_vs_floor']:.2f}x {mark('uncached_vs_floor')}",
        f"  cached switch                       {s['cached_switch_ms']:8.4f}   <= 1 ms {mark('cached_ms')}",
        f"  naive: new session on folded ONNX   {s['naive_switch_ms']:8.1f}   >= 50x uncached: "
        f"{f['naive_vs_uncached']:.0f}x {mark('naive_vs_uncached')}",
        "",
        "predict latency (median, interleaved)  engine ms  folded ms  ratio  target <= 1.03",
    ]
    for batch in (1, 8):
        b = lat[f"batch{batch}"]
        lines.append(f"  batch {batch}                            {b['engine_ms']:9.1f}  {b['folded_ms']:9.1f}  "
                     f"{b['ratio']:.3f}  {mark(f'latency_ratio_b{batch}')}")
    lines += [
        "",
        "peak RSS (separate processes)            MB",
        f"  one plain folded session          {rss['folded']['peak_rss_mb']:8.0f}",
        f"  engine, 8 tasks, cache_tasks=1    {rss['engine-1']['peak_rss_mb']:8.0f}   <= 1.5x folded: "
        f"{f['rss_ratio']:.2f}x {mark('rss_ratio')}",
        f"  engine, 8 tasks, cache_tasks=3    {rss['engine-3']['peak_rss_mb']:8.0f}   per extra cached task "
        f"{summary['per_cached_task_mb']:.0f} MB = {f['per_cached_task_vs_dense']:.2f}x dense "
        f"({s['dense_masked_mb']:.0f} MB) <= 1.1x {mark('per_cached_task_vs_dense')}",
        f"  compact store per task            {s['task_store_mb']:8.1f}",
        "",
    ]
    gpu = r.get("torch_cuda", {})
    if "skipped" in gpu:
        lines.append(f"torch-CUDA switch: not measured ({gpu['skipped']})")
    elif gpu:
        lines.append(f"torch-CUDA switch on {gpu['device']}: uncached {gpu['uncached_switch_ms']:.2f} ms vs H2D copy "
                     f"floor {gpu['h2d_floor_ms']:.2f} ms ({gpu['ratio']:.2f}x)")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--zeros", type=float, default=0.025)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child == "switch":
            result = measure_switch(args.workdir, args.threads, args.repeats)
        elif args.child == "latency":
            result = measure_latency(args.workdir, args.threads, args.repeats)
        elif args.child == "torch_cuda":
            result = measure_torch_cuda(args.workdir, args.threads, args.repeats)
        else:
            result = measure_rss(args.workdir, args.threads, args.child)
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        prepare(args.model, args.zeros, work)
        import onnxruntime

        report = {"model": args.model, "zeros": args.zeros, "threads": args.threads,
                  "onnxruntime": onnxruntime.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                  "switch": _child(work, args.threads, "switch"),
                  "latency": _child(work, args.threads, "latency"),
                  "rss": {what: _child(work, args.threads, what) for what in ("folded", "engine-1", "engine-3")},
                  "torch_cuda": _child(work, args.threads, "torch_cuda")}
    report["summary"] = summarise(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "runtime.json").write_text(json.dumps(report, indent=2) + "\n")
    text = text_report(report)
    (RESULTS / "runtime.txt").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
