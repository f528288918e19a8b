"""Where `Engine.predict`'s time goes on a small tower, against the folded model's plain session.

    python benchmarks/small_model_overhead.py [--model rmt-tiny-vit] [--groups attn] [--rounds 30]

One bundle (2 random tasks at 2.5% zeros, shared + folded), batch 1, 2 threads; interleaved
rounds of 20 calls each, medians. Timed side by side:
  folded            a plain InferenceSession on the task's folded model (image -> logits)
  folded+answer     the same, plus what Engine.predict returns beyond logits (the input's range check,
                    the finite check, softmax, top-1 labels, a Prediction): the floor of any engine call
  shared-feed       the engine's session on base.onnx, the masked weights fed as numpy arrays
  shared-iobind     the same session with every input bound once as an OrtValue (IOBinding)
  backend.run fed   the CPU run without constant sessions: the slot's cached binding, the image bound
  predict fed       the public call on that engine: input checks, task lease, the run, head, softmax
  backend.run       the CPU run of the default engine: the task's constant session (made, waited for)
  engine.predict    the public call on the default engine
So shared-feed / folded is what feeding the weights costs ONNX Runtime, backend.run / folded what the
constant session leaves of it, and engine.predict - backend.run what the engine adds in Python.
Sessions in one process disturb each other on 2 cores (a session's intra-op threads spin after
its run), so `--isolated N` also times folded and engine.predict each alone in its own process,
N processes each, alternated: what a process serving either one sees. Writes results/small_model_overhead[-MODEL].json.
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
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from random_tasks import random_base, random_pack  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def build_bundle(model: str, work: Path, groups: tuple[str, ...] = ("attn",)) -> Path:
    from rmt_deploy.export import ExportConfig, export_bundle

    base = random_base(model, work, groups=groups)
    rng = np.random.default_rng(0)
    paths = [random_pack(base, f"t{i}", rng, 0.025, 10).save(work / f"t{i}.rmtask") for i in range(2)]
    out = work / "bundle"
    export_bundle(ExportConfig(model, str(base.checkpoint), task_paths=paths, out=out, target="onnx",
                               mode="both", max_batch=8), progress=False)
    return out


def contenders(bundle: Path, threads: int) -> dict:
    import onnxruntime as ort

    from rmt_deploy import Engine
    from rmt_deploy.artifacts.bundle import EMBEDDING_OUTPUT, IMAGE_INPUT, LOGITS_OUTPUT, Bundle

    opened = Bundle.open(bundle)
    size = opened.manifest.preprocess.image_size
    height, width = (size, size) if isinstance(size, int) else size
    image = np.random.default_rng(1).standard_normal((1, 3, height, width)).astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    folded = ort.InferenceSession(str(opened.folded_path("t0")), options, providers=["CPUExecutionProvider"])
    fed = Engine.load(bundle, task="t0", threads=threads, constant_sessions=False)
    engine = settled(Engine.load(bundle, task="t0", threads=threads), image)
    labels = list(engine.predict(image).class_names)
    session = fed._backend.session  # the fed engine's session on base.onnx
    lease = fed._pool.acquire("t0", lambda: fed._store.zeros("t0"))  # held for the whole run
    constant = engine._pool.acquire("t0", lambda: engine._store.zeros("t0"))
    feeds = {**lease.arrays, IMAGE_INPUT: image}
    binding = session.io_binding()
    values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}
    for key, value in values.items():
        binding.bind_ortvalue_input(key, value)
    binding.bind_output(EMBEDDING_OUTPUT, "cpu")
    return {
        "folded": lambda: folded.run([LOGITS_OUTPUT], {IMAGE_INPUT: image}),
        "folded+answer": lambda: answer(image, folded, labels),
        "shared-feed": lambda: session.run([EMBEDDING_OUTPUT], feeds),
        "shared-iobind": lambda: session.run_with_iobinding(binding),
        "backend.run fed": lambda: fed._backend.run(image, lease),
        "predict fed": lambda: fed.predict(image),
        "backend.run": lambda: engine._backend.run(image, constant),
        "engine.predict": lambda: engine.predict(image),
    }, {"constant_session": engine.session_stats["ready"] > 0, "masked_tensors": len(lease.arrays),
        "masked_bytes": int(sum(a.nbytes for a in lease.arrays.values()))}


def answer(image: np.ndarray, folded, labels: list[str]) -> object:
    """A folded model's logits with the rest of Engine.predict's work (its own helpers) around them."""
    from rmt_deploy.artifacts.bundle import IMAGE_INPUT, LOGITS_OUTPUT
    from rmt_deploy.runtime.engine import Prediction, _softmax
    from rmt_deploy.runtime.preprocess import _check_float_batch

    logits = folded.run([LOGITS_OUTPUT], {IMAGE_INPUT: _check_float_batch(image, image.shape[2:])})[0]
    if not np.isfinite(np.add.reduce(logits, axis=None)):
        raise ValueError("non-finite logits")
    indices = logits.argmax(axis=1)
    return Prediction("t0", logits, _softmax(logits.copy()), indices, [labels[i] for i in indices], tuple(labels))


def settled(engine, image: np.ndarray, task: str | None = None):
    """The engine once `task`'s (default: the current task's) constant session is made: it is asked for after
    a few predictions, and made in the background while they run."""
    from rmt_deploy.runtime.backends.constant_sessions import ASK_AFTER_USES

    for _ in range(ASK_AFTER_USES):
        engine.predict(image, task=task)
    engine.wait_ready()
    return engine


def measure(fns: dict, rounds: int, calls: int = 20) -> dict[str, float]:
    """Median ms per call of each contender over interleaved rounds of `calls` calls. Each block starts
    with one untimed call: a session's intra-op threads spin for a while after its run, so the first
    call after another session's block competes with them for the cores; the untimed call absorbs that
    (without it, whichever contender follows another session's block in the cycle is timed slower)."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls * 1e3)
    return {name: float(np.median(t)) for name, t in times.items()}


ISOLATED = ("folded", "folded+answer", "predict fed", "engine.predict")


def alone(bundle: Path, name: str, threads: int) -> Callable[[], object]:
    """One contender built by itself: a folded session (alone or with the answer's work), or an Engine."""
    import onnxruntime as ort

    from rmt_deploy import Engine
    from rmt_deploy.artifacts.bundle import IMAGE_INPUT, LOGITS_OUTPUT, Bundle

    opened = Bundle.open(bundle)
    image = np.random.default_rng(1).standard_normal((1, 3, *opened.manifest.preprocess.image_size)).astype(np.float32)
    if name.startswith("folded"):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        folded = ort.InferenceSession(str(opened.folded_path("t0")), options, providers=["CPUExecutionProvider"])
        if name == "folded":
            return lambda: folded.run([LOGITS_OUTPUT], {IMAGE_INPUT: image})
        labels = list(opened.read_task("t0").meta["class_names"])
        return lambda: answer(image, folded, labels)
    engine = Engine.load(bundle, task="t0", threads=threads, constant_sessions=name == "engine.predict")
    settled(engine, image)
    return lambda: engine.predict(image)


def isolated(bundle: Path, threads: int, processes: int) -> dict[str, float]:
    """Median over `processes` alternated child processes of each one's median ms per call."""
    found: dict[str, list[float]] = {name: [] for name in ISOLATED}
    for _ in range(processes):
        for name in ISOLATED:
            out = subprocess.run([sys.executable, __file__, "--child", name, "--bundle", str(bundle),
                                  "--threads", str(threads)], check=True, capture_output=True, text=True).stdout
            found[name].append(float(out.split()[-1]))
    return {name: float(np.median(values)) for name, values in found.items()}


def child(args: argparse.Namespace) -> None:
    fn = alone(Path(args.bundle), args.child, args.threads)
    for _ in range(50):
        fn()
    calls = max(1, int(0.05 / max(1e-6, one_call_seconds(fn))))
    print(measure({args.child: fn}, 10, calls)[args.child])


def one_call_seconds(fn: Callable[[], object]) -> float:
    """Wall seconds of one call (to size the calls per round)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="rmt-tiny-vit")
    parser.add_argument("--groups", default="attn", help="mask groups, comma-separated (docs/families.md)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--isolated", type=int, default=0, metavar="N",
                        help="also time folded and engine.predict alone, N processes each")
    parser.add_argument("--child", choices=ISOLATED, help=argparse.SUPPRESS)
    parser.add_argument("--bundle", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    with tempfile.TemporaryDirectory() as work:
        groups = tuple(args.groups.split(","))
        bundle = build_bundle(args.model, Path(work), groups)
        fns, sizes = contenders(bundle, args.threads)
        medians = measure(fns, args.rounds)
        del fns
        alone_ms = isolated(bundle, args.threads, args.isolated) if args.isolated else {}
    folded = medians["folded"]
    result = {"model": args.model, "groups": args.groups, "batch": 1, "threads": args.threads,
              "rounds": args.rounds, **sizes,
              "median_ms": medians, "ratio_to_folded": {k: v / folded for k, v in medians.items()},
              "engine_python_ms": medians["engine.predict"] - medians["backend.run"],
              "isolated_processes": args.isolated, "isolated_ms": alone_ms,
              "isolated_ratio": alone_ms["engine.predict"] / alone_ms["folded"] if alone_ms else None,
              "isolated_ratio_to_folded_answer": alone_ms["engine.predict"] / alone_ms["folded+answer"]
              if alone_ms else None,
              "machine": {"cpus": os.cpu_count(), "load": os.getloadavg(), "python": platform.python_version()}}
    path = RESULTS / ("small_model_overhead.json" if args.model == "rmt-tiny-vit" else
                      f"small_model_overhead-{args.model}.json")
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    for name, value in medians.items():
        print(f"{name:16} {value:8.4f} ms  {value / folded:.3f}x")
    for name, value in alone_ms.items():
        print(f"alone: {name:16} {value:8.4f} ms  {value / alone_ms['folded']:.3f}x")
    print(f"engine's own work per call: {result['engine_python_ms']:.4f} ms; wrote {path}")


if __name__ == "__main__":
    main()
