"""Serving benchmark: `rmt-deploy serve` (Triton) vs in-process Engine.predict, 1 task and 4 interleaved.

ViT-B-16 with random weights, fp32, ONNX Runtime on CPU. The server runs with --cache-tasks 4
(every task resident, as the in-process engine). Concurrency c (1, 8, 32) = c gRPC clients, each
sending one 224x224 uint8 image per request back to back; the in-process reference runs
Engine.predict on batches of c images (for 4 tasks: c/4 images of each task per step), same
images, preprocessing included on both sides. Clients and server share this machine's cores.
Writes benchmarks/results/serve.json and serve.txt.

    .venv/bin/python benchmarks/serve.py [--model ViT-B-16] [--workdir DIR (keeps the bundle)]
        [--requests-per-client 1:8,8:4,32:2] [--max-queue-delay-us 5000]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
TASKS = [f"task{i}" for i in range(4)]
TARGETS = {"server_vs_inprocess_c8": 0.9, "four_vs_one_task": 0.85}
sys.path.insert(0, str(Path(__file__).parent.parent / "tests" / "serving"))

from random_tasks import random_bundle  # noqa: E402  (benchmarks/random_tasks.py)


def prepare(model_name: str, zeros: float, work: Path) -> Path:
    """Seeded random checkpoint, 4 task packs, a shared bundle (max batch 32)."""
    return random_bundle(model_name, work, TASKS, zeros, lambda i: 10 + i, mode="shared", max_batch=32)


def _images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(n)]


def _stats(latencies: list[float], count: int, elapsed: float) -> dict:
    ms = np.asarray(latencies) * 1000
    return {"throughput_img_s": count / elapsed, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "requests": count, "elapsed_s": elapsed,
            "latencies_ms": ms.tolist()}


def _merge(parts: list[dict]) -> dict:
    """Rounds of one side -> images over total time, percentiles over all latencies."""
    ms = np.concatenate([p["latencies_ms"] for p in parts])
    count, elapsed = sum(p["requests"] for p in parts), sum(p["elapsed_s"] for p in parts)
    return {"throughput_img_s": count / elapsed, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "images": count, "elapsed_s": elapsed,
            "failed": sum(p.get("failed", 0) for p in parts),
            **({"mean_batch": parts[-1]["mean_batch"]} if "mean_batch" in parts[-1] else {})}


def in_process(engine, concurrency: int, tasks: list[str], steps: int) -> dict:
    """Engine.predict on batches of `concurrency` images, split evenly over `tasks`."""
    images = _images(concurrency)
    per_task = max(1, concurrency // len(tasks))
    groups = [images[i * per_task:(i + 1) * per_task] for i in range(max(1, concurrency // per_task))]
    engine.predict(groups[0], task=tasks[0])  # warm-up
    latencies, start = [], time.perf_counter()
    for step in range(steps):
        t0 = time.perf_counter()
        for i, group in enumerate(groups):  # at c=1 with 4 tasks: the task rotates step by step
            engine.predict(group, task=tasks[(step + i) % len(tasks)])
        latencies.append(time.perf_counter() - t0)
    return _stats(latencies, steps * concurrency, time.perf_counter() - start)


def served(url: str, concurrency: int, tasks: list[str], per_client: int) -> dict:
    """`concurrency` gRPC clients, each sending `per_client` one-image requests back to back."""
    import tritonclient.grpc as grpc
    from clients import request  # tests/serving/clients.py

    images, latencies, failures = _images(concurrency), [], []
    lock, barrier = threading.Lock(), threading.Barrier(concurrency + 1)
    outputs = [grpc.InferRequestedOutput(n) for n in ("labels", "probs", "index")]

    def client(i: int) -> None:
        conn = grpc.InferenceServerClient(url)
        try:
            conn.infer("rmt", request(grpc, tasks[i % len(tasks)], images[i]), outputs=outputs)  # warm-up
            barrier.wait()
            for _ in range(per_client):
                t0 = time.perf_counter()
                try:
                    conn.infer("rmt", request(grpc, tasks[i % len(tasks)], images[i]), outputs=outputs)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    with lock:
                        failures.append(str(exc))
                with lock:
                    latencies.append(time.perf_counter() - t0)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    result = _stats(latencies, concurrency * per_client, time.perf_counter() - start)
    result["failed"] = len(failures)
    return result


def start_server(bundle: Path, ports: list[int], delay_us: int, log: Path, extra: list[str]):
    import subprocess

    command = [sys.executable, "-m", "rmt_deploy.cli", "serve", "--bundle", str(bundle), "--host", "127.0.0.1",
               "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
               "--cache-tasks", "4", "--max-batch", "32", "--max-queue-delay-us", str(delay_us), *extra]
    process = subprocess.Popen(command, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    import urllib.request

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(log.read_text())
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/v2/health/ready", timeout=2):
                return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("server not ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--zeros", type=float, default=0.025)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--requests-per-client", default="1:8,8:4,32:2", help="concurrency:requests, "
                        "split over two interleaved rounds")
    parser.add_argument("--max-queue-delay-us", type=int, default=5000)
    parser.add_argument("--serve-args", default="", help="more `rmt-deploy serve` options, e.g. '--instances 2 "
                        "--threads 1'")
    parser.add_argument("--out", default="serve", help="results file stem under benchmarks/results")
    args = parser.parse_args()
    plan = {int(c): int(n) for c, n in (item.split(":") for item in args.requests_per_client.split(","))}
    work = args.workdir or Path(tempfile.mkdtemp(prefix="rmt-serve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    bundle = prepare(args.model, args.zeros, work)

    results = {"model": args.model, "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average "
                                               f"{os.getloadavg()[0]:.1f} at the end",
               "settings": {"cache_tasks": 4, "max_batch": 32, "max_queue_delay_us": args.max_queue_delay_us,
                            "image": "224x224 uint8, one per request", "requests_per_client": plan,
                            "serve_args": args.serve_args},
               "server": {}, "in_process": {}, "load_average_before": os.getloadavg()}
    ports = _free_ports(3)
    process = start_server(bundle, ports, args.max_queue_delay_us, work / "serve.log", args.serve_args.split())
    from rmt_deploy.runtime.engine import Engine

    # the machine is shared and its load drifts: at each concurrency, two rounds of in-process and served,
    # 1 task and 4 tasks, interleaved; each side reports its images over its own time
    try:
        with Engine.load(bundle, cache_tasks=4) as engine:
            for concurrency, per_client in plan.items():
                rows: dict = {}
                for _ in range(2):
                    for label, tasks in (("1 task", TASKS[:1]), ("4 tasks", TASKS)):
                        key, steps = f"{label}, c={concurrency}", max(1, per_client // 2)
                        rows.setdefault(("in_process", key), []).append(in_process(engine, concurrency, tasks, steps))
                        before = _counts(ports[0])
                        rows.setdefault(("server", key), []).append(
                            served(f"127.0.0.1:{ports[1]}", concurrency, tasks, steps))
                        rows["server", key][-1]["mean_batch"] = _mean_batch(ports[0], before)
                for (side, key), parts in rows.items():
                    results[side][key] = _merge(parts)
                    print(f"{side:10} {key}: {results[side][key]}", flush=True)
    finally:
        import signal

        process.send_signal(signal.SIGTERM)
        results["server_exit_status"] = process.wait(120)
    results["load_average_after"] = os.getloadavg()
    results["ratios"] = ratios(results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"{args.out}.txt").write_text(text_report(results) + "\n")
    print(text_report(results))


def _counts(http_port: int) -> tuple[int, int]:
    """Triton's (inference_count, execution_count) of the model: requests and the batches they ran in."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/models/rmt/stats", timeout=10) as response:
        stats = json.loads(response.read())["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def _mean_batch(http_port: int, before: tuple[int, int]) -> float:
    after = _counts(http_port)
    return (after[0] - before[0]) / max(1, after[1] - before[1])


def _free_ports(n: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def ratios(r: dict) -> dict:
    tput = {side: {k: v["throughput_img_s"] for k, v in r[side].items()} for side in ("server", "in_process")}
    out = {}
    for key in tput["server"]:
        out[f"server / in-process, {key}"] = tput["server"][key] / tput["in_process"][key]
    for side in ("server", "in_process"):
        for key in tput[side]:
            if key.startswith("4 tasks"):
                out[f"{side}: 4 tasks / 1 task, {key[9:]}"] = tput[side][key] / tput[side]["1 task" + key[7:]]
    out["targets"] = TARGETS
    return out


def text_report(r: dict) -> str:
    lines = [f"rmt-deploy serve vs in-process Engine.predict: {r['model']} random weights, fp32, ONNX Runtime CPU; "
             f"{r['machine']}", f"{'':22} {'server img/s':>13} {'p50 ms':>9} {'p99 ms':>9}   "
             f"{'in-process img/s':>16} {'p50 ms':>9} {'p99 ms':>9}   ratio"]
    for key, row in r["server"].items():
        ref = r["in_process"][key]
        lines.append(f"{key:22} {row['throughput_img_s']:13.2f} {row['p50_ms']:9.0f} {row['p99_ms']:9.0f}   "
                     f"{ref['throughput_img_s']:16.2f} {ref['p50_ms']:9.0f} {ref['p99_ms']:9.0f}   "
                     f"{row['throughput_img_s'] / ref['throughput_img_s']:.2f}x")
    lines += [f"{k}: {v:.2f}" for k, v in r["ratios"].items() if k != "targets"]
    lines.append("server mean batch (Triton inference/execution counts): " + ", ".join(
        f"{k} {v['mean_batch']:.1f}" for k, v in r["server"].items() if "mean_batch" in v))
    lines.append(f"targets: server >= {TARGETS['server_vs_inprocess_c8']}x in-process at c=8; "
                 f"4 tasks >= {TARGETS['four_vs_one_task']}x 1 task")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
