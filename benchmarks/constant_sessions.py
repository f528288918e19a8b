"""Can a resident task get a session whose masked weights are constants, without copying them?

    python benchmarks/constant_sessions.py [--model MobileCLIP2-S0] [--groups attn,mlp] [--rounds 12]

The shared graph takes the masked tensors as inputs, so ONNX Runtime neither prepacks them nor
moves the convolutions using them into its NCHWc layout. A session per resident task with those
tensors constant, taken from the pool's buffers, would not pay that. ONNX Runtime offers two ways
to hand it the buffers; this checks each for exactness against the engine (random input, two tasks)
and times it against the folded model and the engine's own run (interleaved rounds, medians):
  add_initializer            base.onnx's masked inputs turned into initializers (zeros in the file),
                             the buffers added with SessionOptions.add_initializer
  add_external_initializers  the same initializers marked as external data at a location that never
                             exists, the buffers given with SessionOptions.add_external_initializers
Writes results/constant_sessions[-MODEL].json. Needs `onnx` (the train extra) to write the graphs.
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
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from small_model_overhead import build_bundle, measure, one_call_seconds  # noqa: E402

RESULTS = Path(__file__).parent / "results"
WAYS = ("add_initializer", "add_external_initializers")


def constant_graph(base: Path, arrays: dict[str, np.ndarray], way: str, out: Path) -> Path:
    """base.onnx with the masked inputs as initializers: zeros stored in the file, or external data."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(base))
    inputs = [i for i in model.graph.input if i.name not in arrays]
    for name, array in arrays.items():
        if way == "add_initializer":
            model.graph.initializer.append(numpy_helper.from_array(np.zeros_like(array), name))
            continue
        tensor = onnx.TensorProto(name=name, data_type=numpy_helper.helper.np_dtype_to_tensor_dtype(array.dtype),
                                  dims=array.shape, data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", "supplied-by-the-session"), ("offset", "0"), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        model.graph.initializer.append(tensor)
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    onnx.save(model, str(out))
    return out


def constant_session(graph: Path, arrays: dict[str, np.ndarray], way: str, threads: int) -> tuple[Any, float]:
    """A session on `graph` whose masked initializers are the given buffers; and its creation time in ms."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
    if way == "add_initializer":
        for name, value in values.items():
            options.add_initializer(name, value)
    else:
        options.add_external_initializers(list(values), list(values.values()))
    start = time.perf_counter()
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    session.keep_alive = values  # the session reads these buffers: they live as long as it does
    return session, (time.perf_counter() - start) * 1e3


def check_and_time(bundle: Path, threads: int, rounds: int) -> dict[str, Any]:
    import onnxruntime as ort

    from rmt_deploy import Engine
    from rmt_deploy.artifacts.bundle import EMBEDDING_OUTPUT, IMAGE_INPUT, LOGITS_OUTPUT, Bundle

    opened = Bundle.open(bundle)
    image = np.random.default_rng(1).standard_normal((1, 3, *opened.manifest.preprocess.image_size)).astype(np.float32)
    engine = Engine.load(bundle, task="t0", threads=threads, cache_tasks=2, constant_sessions=False)
    leases = {task: engine._pool.acquire(task, lambda task=task: engine._store.zeros(task)) for task in ("t0", "t1")}
    fed = {task: engine._backend.run(image, lease) for task, lease in leases.items()}
    base = opened.file(opened.manifest.files["onnx"]["base"])
    result: dict[str, Any] = {"tasks_differ_by": float(np.abs(fed["t0"] - fed["t1"]).max())}
    fns: dict[str, Callable[[], object]] = {}
    for way in WAYS:
        graph = constant_graph(base, dict(leases["t0"].arrays), way, bundle.parent / f"{way}.onnx")
        errors, made = {}, []
        for task, lease in leases.items():
            session, ms = constant_session(graph, dict(lease.arrays), way, threads)
            errors[task] = float(np.abs(session.run([EMBEDDING_OUTPUT], {IMAGE_INPUT: image})[0] - fed[task]).max())
            made.append(ms)
        result[way] = {"max_abs_error_vs_engine": errors, "session_ms": made}
        fns[way] = lambda session=session: session.run([EMBEDDING_OUTPUT], {IMAGE_INPUT: image})
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    folded = ort.InferenceSession(str(opened.folded_path("t1")), options, providers=["CPUExecutionProvider"])
    timed = {"folded": lambda: folded.run([LOGITS_OUTPUT], {IMAGE_INPUT: image}),
             "engine run (fed)": lambda: engine._backend.run(image, leases["t1"]), **fns}
    calls = max(1, int(0.05 / max(1e-6, one_call_seconds(timed["folded"]))))
    medians = measure(timed, rounds, calls)
    result["median_ms"] = medians
    result["ratio_to_folded"] = {k: v / medians["folded"] for k, v in medians.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="MobileCLIP2-S0")
    parser.add_argument("--groups", default="attn,mlp")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        found = check_and_time(build_bundle(args.model, Path(work), tuple(args.groups.split(","))),
                               args.threads, args.rounds)
    result = {"model": args.model, "groups": args.groups, "batch": 1, "threads": args.threads,
              "rounds": args.rounds, **found,
              "machine": {"cpus": os.cpu_count(), "load": os.getloadavg(), "python": platform.python_version()}}
    path = RESULTS / f"constant_sessions-{args.model}.json"
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"tasks t0 and t1 differ by up to {found['tasks_differ_by']:.3g}")
    for way in WAYS:
        print(f"{way:26} max abs error vs the engine {found[way]['max_abs_error_vs_engine']}, "
              f"session made in {', '.join(f'{ms:.0f}' for ms in found[way]['session_ms'])} ms")
    for name, value in found["median_ms"].items():
        print(f"{name:26} {value:9.4f} ms  {found['ratio_to_folded'][name]:.3f}x")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
