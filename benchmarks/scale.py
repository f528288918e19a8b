"""Scale benchmark: thousands of tasks on one base, and ONNX Runtime's multi-LoRA adapters beside it.

Part 1, ViT-B-16 fp32 (random weights), ONNX Runtime on CPU: one exported task plus
N-1 synthetic tasks (2.5% zeros, made with TaskPack and added with `bundle add`):
load time vs the same bundle with 1 task, memory per cold task, switch p50/p99 from each
tier beside the materialisation floor (np.multiply of base and mask, timed interleaved),
a new folded session, predict vs the folded model, correctness of a sample, and the
peer: ORT AdapterFormat files holding each task's dense masked tensors, activated per run
with RunOptions.add_active_adapter; and N folded sessions for memory.
Part 2, the tiny model with 10,000 tasks: load time, RSS, add/remove throughput, a sample.

Memory figures come from fresh subprocesses (VmRSS deltas). Writes benchmarks/results/scale.json.

    .venv/bin/python benchmarks/scale.py [--tasks 1000] [--tiny-tasks 10000] [--workdir DIR] [--threads 2]
        [--only switch,predict]   (with --workdir: rerun some steps, keep the others' results)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from random_tasks import RandomBase, random_base, random_pack  # benchmarks/random_tasks.py

RESULTS = Path(__file__).parent / "results"
ZEROS = 0.025
CLASSES = 47  # DTD's class count
TARGETS = {"cold_vs_encoded": 1.2, "cold_mb_vit_b16": 0.8, "load_ratio": 2.0, "switch_vs_floor": 1.5,
           "naive_vs_warm": 50.0, "cached_ms": 1.0, "predict_vs_folded": 1.03, "adapter_disk_ratio": 100.0,
           "adapter_memory_ratio": 100.0, "tiny_load_s": 2.0}


# ---------------------------------------------------------------- helpers

def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def timed_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def pct(samples: list[float]) -> dict[str, float]:
    values = np.asarray(samples)
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)), "n": len(samples)}


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def images(batch: int, size: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((batch, 3, *size)).astype(np.float32)


def synthetic_pack(base: RandomBase, name: str, seed: int, classes: int = CLASSES):
    """A random task through the project's own TaskPack API (masks at ZEROS, a unit-norm head)."""
    return random_pack(base, name, np.random.default_rng(seed), ZEROS, classes)


def sub(part: str, args: argparse.Namespace, *extra: str) -> dict:
    """Run one measurement in a fresh process; it prints one JSON line."""
    cmd = [sys.executable, __file__, "--part", part, "--workdir", str(args.workdir), "--threads", str(args.threads),
           "--tasks", str(args.tasks), "--tiny-tasks", str(args.tiny_tasks), *extra]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- preparation (needs torch)

def prepare(work: Path, model_name: str, tasks: int, folded: bool) -> dict:
    """bundle-1 (one exported task, folded too) and bundle-N (the same plus N-1 added tasks)."""
    one, many = work / "bundle-1", work / "bundle-N"
    info_path = work / "prepared.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    from rmt_deploy.export import ExportConfig, export_bundle
    from rmt_deploy.tools.bundle_edit import add_tasks

    base = random_base(model_name, work)
    packs = work / "packs"
    packs.mkdir(exist_ok=True)
    first = synthetic_pack(base, "task0", 0).save(packs / "task0.rmtask")
    export_bundle(ExportConfig(model_name, str(base.checkpoint), [first], one, mode="both" if folded else "shared",
                               max_batch=8, verify=False), progress=False)
    start = time.perf_counter()
    paths = [synthetic_pack(base, f"task{i}", i).save(packs / f"task{i}.rmtask") for i in range(1, tasks)]
    make_s = time.perf_counter() - start
    shutil.copytree(one, many)
    start = time.perf_counter()
    add_tasks(many, paths)
    add_s = time.perf_counter() - start
    info = {"model": model_name, "tasks": tasks, "make_packs_s": make_s,
            "bundle_add_tasks_per_s": (tasks - 1) / add_s, "rmtask_bytes_mean": float(np.mean(
                [p.stat().st_size for p in paths[:50]]))}
    info_path.write_text(json.dumps(info))
    return info


# ---------------------------------------------------------------- measurements (no torch)

def measure_load(work: Path, threads: int, repeats: int = 5) -> dict:
    """Engine.load of bundle-N vs bundle-1, interleaved."""
    from rmt_deploy.runtime.engine import Engine

    times: dict[str, list[float]] = {"one": [], "many": []}
    for _ in range(repeats):
        for key, root in (("one", work / "bundle-1"), ("many", work / "bundle-N")):
            engine = None

            def load():
                nonlocal engine
                engine = Engine.load(root, threads=threads, cache_tasks=1)

            times[key].append(timed_ms(load))
            engine.close()
    one, many = float(np.median(times["one"])), float(np.median(times["many"]))
    return {"load_1_task_ms": one, "load_n_tasks_ms": many, "load_ratio": many / one}


def part_cold_rss(work: Path, threads: int, count: int) -> dict:
    """RSS growth per task made cold (read, verified, kept encoded) by switching through `count` tasks:
    the slope from the first quarter to the end (the first tasks reuse memory the load freed)."""
    from rmt_deploy.runtime.engine import Engine

    engine = Engine.load(work / "bundle-N", threads=threads, cache_tasks=1, warm_bytes=0)
    names = engine.tasks[1:count + 1]
    marks = []
    for index, name in enumerate(names, 1):
        engine.switch(name)
        if index in (len(names) // 4, len(names)):
            engine.switch(engine.tasks[0])
            marks.append((index, rss_mb(), engine.store_stats["cold_bytes"]))
    (i0, rss0, held0), (i1, rss1, held1) = marks
    return {"tasks_made_cold": len(names), "rss_per_cold_task_mb": (rss1 - rss0) / (i1 - i0),
            "held_per_cold_task_mb": (held1 - held0) / (i1 - i0) / 2**20, "store": engine.store_stats}


def _floor(work: Path):
    """The materialisation floor: np.multiply of base and a dense mask over every masked tensor."""
    from safetensors.numpy import load_file

    from rmt_deploy.artifacts.bundle import Bundle
    from rmt_deploy.artifacts.masks import decode_mask

    bundle = Bundle.open(work / "bundle-N")
    base = load_file(str(bundle.root / bundle.manifest.base_weights))
    blobs = bundle.read_task(bundle.tasks[-1]).blobs
    masks = {t.name: decode_mask(blobs[t.name], tuple(t.shape)) for t in bundle.manifest.masked_tensors}
    base = {t.name: base[t.name] if t.name in base else base[t.input_name] for t in bundle.manifest.masked_tensors}
    out = {n: np.empty_like(a) for n, a in base.items()}

    def floor():
        for name, value in base.items():
            np.multiply(value, masks[name], out=out[name])

    return floor


def measure_switch(work: Path, threads: int, samples: int) -> dict:
    """Switch p50/p99 from each tier. The tiers take turns sample by sample, each switch followed by one
    floor sample, so load on the machine falls on all of them alike."""
    from rmt_deploy.artifacts.bundle import Bundle
    from rmt_deploy.bench.sessions import folded_session
    from rmt_deploy.runtime.engine import Engine

    floor = _floor(work)
    root = work / "bundle-N"
    names = Bundle.open(root).tasks
    ring, fresh = names[1:21], iter(names[21:])
    samples = min(samples, len(names) - 21)
    cached = Engine.load(root, threads=threads, cache_tasks=2)
    warm = Engine.load(root, threads=threads, cache_tasks=1, warm_bytes=1 << 30)
    cold = Engine.load(root, threads=threads, cache_tasks=1, warm_bytes=0)
    disk = Engine.load(root, threads=threads, cache_tasks=1, warm_bytes=0)
    try:
        cached.switch(names[1]), cached.switch(names[2])
        for name in ring:
            warm.switch(name), cold.switch(name)
        plans = {"cached": (cached, lambda i: names[1 + i % 2], "resident"),
                 "warm": (warm, lambda i: ring[i % len(ring)], "warm"),
                 "cold": (cold, lambda i: ring[i % len(ring)], "cold"),
                 "disk": (disk, lambda i: next(fresh), "disk")}
        times: dict[str, list[float]] = {tier: [] for tier in plans}
        floor_ms: list[float] = []
        naive: list[float] = []
        bundle = Bundle.open(root)
        for i in range(samples):
            for tier, (engine, pick, before) in plans.items():
                name = pick(i)
                assert engine.tier(name) == before, (tier, name, engine.tier(name))
                times[tier].append(timed_ms(lambda: engine.switch(name)))
                floor_ms.append(timed_ms(floor))
            if i % 4 == 0:  # the naive switch: a new session on a folded model, interleaved too
                naive.append(timed_ms(lambda: folded_session(bundle, names[0], threads)))
        times["cached"] += [timed_ms(lambda: cached.switch(names[1 + i % 2])) for i in range(samples * 3)]
    finally:
        for engine in (cached, warm, cold, disk):
            engine.close()
    result = {tier: pct(values) for tier, values in times.items()}
    floor_p50 = float(np.median(floor_ms))
    ratios = {tier: result[tier]["p50"] / floor_p50 for tier in ("warm", "cold", "disk")}
    return {"switch_ms": result, "floor_ms": pct(floor_ms), "naive_new_session_ms": float(np.median(naive)),
            "switch_p50_vs_floor": ratios, "naive_vs_warm": float(np.median(naive)) / result["warm"]["p50"]}


def dense_reference(bundle, session, weights: dict, name: str, batch: np.ndarray) -> np.ndarray:
    """Logits of base.onnx fed base * mask: what a folded model of the task computes."""
    from rmt_deploy.artifacts.masks import decode_mask
    from rmt_deploy.artifacts.task_file import read_encoded

    manifest = bundle.manifest
    encoded = read_encoded(bundle.task_path(name))
    feeds = {manifest.input_name: batch}
    for t in manifest.masked_tensors:
        feeds[t.input_name] = weights[t.name] * decode_mask(encoded.blobs[t.name], tuple(t.shape))
    emb = session.run([manifest.output_name], feeds)[0]
    return float(encoded.meta["logit_scale"]) * emb @ encoded.head.T


def _base_session(bundle, threads: int):
    import onnxruntime as ort
    from safetensors.numpy import load_file

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(bundle.root / bundle.manifest.files["onnx"]["base"]), options,
                                   providers=["CPUExecutionProvider"])
    raw = load_file(str(bundle.root / bundle.manifest.base_weights))
    weights = {t.name: raw[t.name] if t.name in raw else raw[t.input_name] for t in bundle.manifest.masked_tensors}
    return session, weights


def measure_predict_and_correctness(work: Path, threads: int, repeats: int, sample: int) -> dict:
    from rmt_deploy.artifacts.bundle import Bundle
    from rmt_deploy.bench.sessions import folded_session
    from rmt_deploy.runtime.engine import Engine

    bundle = Bundle.open(work / "bundle-N")
    size = tuple(bundle.manifest.preprocess.image_size)
    batch = images(1, size)
    out = {}
    with Engine.load(bundle, threads=threads, cache_tasks=2) as engine:
        folded = folded_session(bundle, "task0", threads)
        ours, theirs = [], []
        for _ in range(repeats):
            ours.append(timed_ms(lambda: engine.predict(batch, task="task0")))
            theirs.append(timed_ms(lambda: folded.run(["logits"], {bundle.manifest.input_name: batch})))
        out["predict_b1_ms"] = {"engine": pct(ours), "folded": pct(theirs),
                                "ratio_p50": float(np.median(ours) / np.median(theirs))}
        probe = images(4, size)
        out["task0_vs_folded_rel_l2"] = rel_l2(engine.predict(probe, task="task0").logits,
                                               folded.run(["logits"], {bundle.manifest.input_name: probe})[0])
        folded = None  # free the folded session before the dense reference session
        session, weights = _base_session(bundle, threads)
        rng = np.random.default_rng(0)
        picked = sorted(rng.choice(len(bundle.tasks), size=min(sample, len(bundle.tasks)), replace=False))
        errors = [rel_l2(engine.predict(probe, task=bundle.tasks[i]).logits,
                         dense_reference(bundle, session, weights, bundle.tasks[i], probe)) for i in picked]
        out["sample_vs_dense_rel_l2_max"] = float(max(errors))
        out["sample_size"] = len(errors)
    return out


# ---------------------------------------------------------------- the peer: ORT multi-LoRA adapters

def prepare_adapters(work: Path, count: int) -> list[Path]:
    """A 'defaults' copy of base.onnx (masked inputs with the base as initializers, as LoRA graphs are)
    and `count` AdapterFormat files, each holding one task's dense masked tensors."""
    import onnx_ir as ir
    import onnxruntime as ort

    from rmt_deploy.artifacts.bundle import Bundle
    from rmt_deploy.artifacts.masks import decode_mask
    from rmt_deploy.export.onnx import set_defaults

    folder = work / "adapters"
    paths = [folder / f"task{i}.onnx_adapter" for i in range(1, count + 1)]
    if all(p.is_file() for p in paths) and (folder / "peer.onnx").is_file():
        return paths
    folder.mkdir(exist_ok=True)
    bundle = Bundle.open(work / "bundle-N")
    _, weights = _base_session(bundle, 1)
    model = ir.load(str(bundle.root / bundle.manifest.files["onnx"]["base"]))
    set_defaults(model, {t.input_name: weights[t.name] for t in bundle.manifest.masked_tensors})
    ir.save(model, str(folder / "peer.onnx"), external_data="peer.onnx.data")
    for path in paths:
        blobs = bundle.read_task(path.stem).blobs
        params = {t.input_name: ort.OrtValue.ortvalue_from_numpy(
            weights[t.name] * decode_mask(blobs[t.name], tuple(t.shape))) for t in bundle.manifest.masked_tensors}
        adapter = ort.AdapterFormat()
        adapter.set_parameters(params)
        adapter.export_adapter(str(path))
    return paths


def part_adapter_rss(work: Path, threads: int, count: int) -> dict:
    """RSS growth per ORT adapter (one task's dense masked tensors each): once loaded, and once each
    has served a run (its pages are then resident)."""
    import onnxruntime as ort

    from rmt_deploy.artifacts.bundle import Bundle

    manifest = Bundle.open(work / "bundle-N").manifest
    batch = {manifest.input_name: images(1, tuple(manifest.preprocess.image_size))}
    session = ort.InferenceSession(str(work / "adapters" / "peer.onnx"), providers=["CPUExecutionProvider"])
    session.run([manifest.output_name], batch)
    paths = sorted((work / "adapters").glob("*.onnx_adapter"))[:count]
    before = rss_mb()
    adapters = []
    for path in paths:
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        adapters.append(adapter)
    loaded = rss_mb()
    for adapter in adapters:
        run = ort.RunOptions()
        run.add_active_adapter(adapter)
        session.run([manifest.output_name], batch, run)
    used = rss_mb()
    return {"rss_per_adapter_loaded_mb": (loaded - before) / len(adapters),
            "rss_per_adapter_mb": (used - before) / len(adapters), "adapters": len(adapters)}


def part_folded_rss(work: Path, threads: int, count: int) -> dict:
    """RSS growth per folded session of the exported task."""
    from rmt_deploy.artifacts.bundle import Bundle
    from rmt_deploy.bench.sessions import folded_session

    bundle = Bundle.open(work / "bundle-1")
    before = rss_mb()
    sessions = [folded_session(bundle, "task0", threads) for _ in range(count)]
    return {"rss_per_folded_session_mb": (rss_mb() - before) / len(sessions), "sessions": len(sessions)}


def measure_adapters(work: Path, threads: int, repeats: int, paths: list[Path]) -> dict:
    """The peer's switch and predict beside ours: a run with another adapter than the last vs the same."""
    import onnxruntime as ort

    from rmt_deploy.artifacts.bundle import Bundle
    from rmt_deploy.runtime.engine import Engine

    bundle = Bundle.open(work / "bundle-N")
    manifest = bundle.manifest
    batch = images(1, tuple(manifest.preprocess.image_size))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(work / "adapters" / "peer.onnx"), options, providers=["CPUExecutionProvider"])
    adapters, runs = [], []
    load_ms = []
    for path in paths:
        adapter = ort.LoraAdapter()
        load_ms.append(timed_ms(lambda: adapter.Load(str(path))))
        run = ort.RunOptions()
        run.add_active_adapter(adapter)
        adapters.append(adapter)
        runs.append(run)
    names = [p.stem for p in paths]
    with Engine.load(bundle, threads=threads, cache_tasks=1) as engine:
        same, other, ours_same, ours_other = [], [], [], []
        for i in range(repeats):
            same.append(timed_ms(lambda: session.run([manifest.output_name], {manifest.input_name: batch}, runs[0])))
            other.append(timed_ms(lambda: session.run([manifest.output_name], {manifest.input_name: batch},
                                                      runs[1 + i % (len(runs) - 1)])))
            engine.switch(names[0])
            ours_same.append(timed_ms(lambda: engine.predict(batch, task=names[0])))
            ours_other.append(timed_ms(lambda: engine.predict(batch, task=names[1 + i % (len(names) - 1)])))
        emb = session.run([manifest.output_name], {manifest.input_name: batch}, runs[0])[0]
        check = rel_l2(engine.embed(batch, names[0]), emb)
    peer_switch = float(np.median(other) - np.median(same))
    ours_switch = float(np.median(ours_other) - np.median(ours_same))
    return {"adapter_load_ms": float(np.median(load_ms)), "adapter_file_mb": paths[0].stat().st_size / 2**20,
            "peer_predict_same_adapter_ms": pct(same), "peer_predict_other_adapter_ms": pct(other),
            "ours_predict_same_task_ms": pct(ours_same), "ours_predict_other_task_ms": pct(ours_other),
            "peer_switch_cost_ms": peer_switch, "ours_switch_cost_ms": ours_switch,
            "peer_vs_ours_embedding_rel_l2": check}


# ---------------------------------------------------------------- part 2: the tiny model, 10,000 tasks

def prepare_tiny(work: Path, tasks: int) -> dict:
    root = work / "tiny-N"
    info_path = work / "tiny.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    from rmt_deploy.export import ExportConfig, export_bundle
    from rmt_deploy.tools.bundle_edit import add_tasks, remove_tasks

    model_name = "rmt-tiny-vit"
    base = random_base(model_name, work, checkpoint="tiny.safetensors")
    packs = work / "tiny-packs"
    packs.mkdir(exist_ok=True)
    first = synthetic_pack(base, "t0", 0, classes=5).save(packs / "t0.rmtask")
    export_bundle(ExportConfig(model_name, str(base.checkpoint), [first], root, mode="shared", max_batch=8,
                               verify=False), progress=False)
    paths = [synthetic_pack(base, f"t{i}", i, classes=5).save(packs / f"t{i}.rmtask")
             for i in range(1, tasks)]
    start = time.perf_counter()
    add_tasks(root, paths)
    add_rate = (tasks - 1) / (time.perf_counter() - start)
    extra = [synthetic_pack(base, f"x{i}", 10**6 + i, classes=5).save(packs / f"x{i}.rmtask")
             for i in range(200)]
    start = time.perf_counter()
    add_tasks(root, extra)
    remove_tasks(root, [p.stem for p in extra])
    cycle_rate = len(extra) / (time.perf_counter() - start)
    info = {"bundle_add_tasks_per_s": add_rate, "bundle_add_then_remove_200_per_s": cycle_rate}
    info_path.write_text(json.dumps(info))
    return info


def part_tiny(work: Path, threads: int, sample: int) -> dict:
    """Load time and RSS of 10,000 tasks, hot add/remove throughput, a sample checked against dense."""
    from rmt_deploy.artifacts.bundle import Bundle
    from rmt_deploy.runtime.engine import Engine

    before = rss_mb()
    root = work / "tiny-N"
    loads = []
    for _ in range(3):
        start = time.perf_counter()
        engine = Engine.load(root, threads=threads, cache_tasks=2)
        loads.append(time.perf_counter() - start)
        if len(loads) < 3:
            engine.close()
    rss_loaded = rss_mb() - before
    bundle = Bundle.open(root)
    session, weights = _base_session(bundle, threads)
    probe = images(2, tuple(bundle.manifest.preprocess.image_size))
    rng = np.random.default_rng(1)
    picked = [bundle.tasks[i] for i in sorted(rng.choice(len(bundle.tasks), sample, replace=False))]
    errors = [rel_l2(engine.predict(probe, task=n).logits, dense_reference(bundle, session, weights, n, probe))
              for n in picked]
    packs = sorted((work / "tiny-packs").glob("x*.rmtask"))
    start = time.perf_counter()
    for path in packs:
        engine.add_task(path)
    add_rate = len(packs) / (time.perf_counter() - start)
    start = time.perf_counter()
    for path in packs:
        engine.remove_task(path.stem)
    remove_rate = len(packs) / (time.perf_counter() - start)
    tasks = len(engine.tasks)
    engine.close()
    return {"tasks": tasks, "load_s": float(np.median(loads)), "rss_after_load_mb": rss_loaded,
            "sample": len(errors), "sample_vs_dense_rel_l2_max": float(max(errors)),
            "engine_add_task_per_s": add_rate, "engine_remove_task_per_s": remove_rate}


# ---------------------------------------------------------------- main

def summary(r: dict) -> dict:
    vit, peer = r["vit"], r["vit"]["adapters"]
    cold_mb = vit["cold"]["rss_per_cold_task_mb"]
    encoded_mb = vit["cold"]["held_per_cold_task_mb"]
    ours_disk_mb = vit["prepared"]["rmtask_bytes_mean"] / 2**20
    return {
        "cold_task_rss_mb": cold_mb, "cold_vs_encoded": cold_mb / encoded_mb,
        "load_ratio": vit["load"]["load_ratio"],
        "switch_p50_vs_floor": vit["switch"]["switch_p50_vs_floor"],
        "naive_vs_warm": vit["switch"]["naive_vs_warm"],
        "cached_switch_p50_ms": vit["switch"]["switch_ms"]["cached"]["p50"],
        "predict_vs_folded": vit["predict"]["predict_b1_ms"]["ratio_p50"],
        "adapter_disk_ratio": peer["adapter_file_mb"] / ours_disk_mb,
        "adapter_memory_ratio": r["vit"]["adapter_rss"]["rss_per_adapter_mb"] / cold_mb,
        "folded_session_memory_ratio": r["vit"]["folded_rss"]["rss_per_folded_session_mb"] / cold_mb,
        "peer_switch_vs_floor": max(peer["peer_switch_cost_ms"], 0.0) / vit["switch"]["floor_ms"]["p50"],
        "peer_predict_vs_ours": peer["peer_predict_same_adapter_ms"]["p50"] / peer["ours_predict_same_task_ms"]["p50"],
        "tiny_load_s": r["tiny"]["load_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--tiny-tasks", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--part", default="all")
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--tag", default="", help="with --only: store these steps' results under vit_TAG")
    parser.add_argument("--only", default="", help="comma-separated steps to rerun: load,cold,switch,predict,"
                                                   "adapters,tiny (others are kept from results/scale.json)")
    args = parser.parse_args()
    if args.part != "all":
        parts = {"cold-rss": part_cold_rss, "adapter-rss": part_adapter_rss, "folded-rss": part_folded_rss,
                 "tiny": part_tiny}
        print(json.dumps(parts[args.part](args.workdir, args.threads, args.count)))
        return
    own = args.workdir is None
    args.workdir = Path(tempfile.mkdtemp(prefix="rmt-scale-")) if own else args.workdir
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        run_steps(args, own)
    finally:
        if own:
            shutil.rmtree(args.workdir, ignore_errors=True)


def run_steps(args: argparse.Namespace, own: bool) -> None:
    """Every measurement (or those in --only, updating the committed results) in order."""
    work, threads = args.workdir, args.threads
    path = RESULTS / "scale.json"
    result = json.loads(path.read_text()) if args.only and path.is_file() else {"vit": {}, "tiny": {}}
    result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": threads,
                         "python": platform.python_version()}
    vit, tiny = result["vit"], result["tiny"]
    vit["prepared"] = prepare(work, args.model, args.tasks, folded=True)
    if args.tag:  # the same steps under another environment (e.g. numpy 2): kept beside, not instead
        vit = result.setdefault(f"vit_{args.tag}", {"prepared": vit["prepared"]})
        tiny = result.setdefault(f"tiny_{args.tag}", {})
        vit["numpy"] = np.__version__
    steps = {
        "load": lambda: vit.update(load=measure_load(work, threads)),
        "cold": lambda: vit.update(cold=sub("cold-rss", args, "--count", str(min(800, args.tasks - 1)))),
        "switch": lambda: vit.update(switch=measure_switch(work, threads, samples=40)),
        "predict": lambda: vit.update(predict=measure_predict_and_correctness(work, threads, 30, 10)),
        "adapters": lambda: vit.update(adapters=measure_adapters(work, threads, 20, prepare_adapters(work, 3)),
                                       adapter_rss=sub("adapter-rss", args, "--count", "3"),
                                       folded_rss=sub("folded-rss", args, "--count", "3")),
        "tiny": lambda: (tiny.update(prepared=prepare_tiny(work, args.tiny_tasks)),
                         tiny.update(sub("tiny", args, "--count", "50"))),
    }
    for name in (args.only.split(",") if args.only else steps):
        steps[name]()
        print(name, json.dumps(vit.get(name, tiny if name == "tiny" else None))[:2000], flush=True)
    result["numpy"] = result.get("numpy") if args.tag else np.__version__
    result["summary"] = summary(result)
    for key in [k for k in result if k.startswith("vit_") and "switch" in result[k]]:
        result["summary"][f"switch_p50_vs_floor_{key[4:]}"] = result[key]["switch"]["switch_p50_vs_floor"]
        result["summary"][f"naive_vs_warm_{key[4:]}"] = result[key]["switch"]["naive_vs_warm"]
    result["targets"] = TARGETS
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
