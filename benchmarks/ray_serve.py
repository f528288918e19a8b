"""Ray Serve benchmark: requests/s of the KServe v2 ingress with 1 and 2 replicas, and how often a
request lands on a replica that already holds its task, multiplexed vs round-robin, in one run.

rmt-small-vit (64 px, 4 layers, width 128) with random weights, 8 tasks at 2.5% zeros, fp32,
ONNX Runtime, 1 thread per replica, cache_tasks=2, on a local Ray cluster of `--cpus` CPUs.
Closed loop: `--clients` threads send `--requests` requests (one 64x64 image each, Triton's
binary tensor extension, as tritonclient sends by default), tasks drawn uniformly from a
workload's task set. "resident hit": the replica held the task's weights when the request
arrived (so no mask rewrite was needed). Round-robin: one single-replica deployment per
replica, the ingress rotating over them, task-blind. Writes results/ray_serve.{json,txt}.

    .venv/bin/python benchmarks/ray_serve.py [--model rmt-small-vit] [--requests 400] [--clients 8]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from random_tasks import random_bundle  # benchmarks/random_tasks.py

RESULTS = Path(__file__).parent / "results"
TASKS = [f"task{i}" for i in range(8)]
WORKLOADS = {"4 tasks": TASKS[:4], "8 tasks": TASKS}  # 2 replicas x cache_tasks 2 = 4 resident slots
ARMS = [("multiplexed", 1), ("multiplexed", 2), ("round_robin", 2)]


def prepare(model_name: str, zeros: float, work: Path) -> Path:
    """Seeded random checkpoint, 8 task packs, a shared-mode bundle (needs torch; done once)."""
    return random_bundle(model_name, work, TASKS, zeros, lambda i: 10, mode="shared", max_batch=8)


def _body(task: str, image: np.ndarray) -> tuple[bytes, dict]:
    name = len(task).to_bytes(4, "little") + task.encode()
    header = json.dumps({"inputs": [
        {"name": "task", "datatype": "BYTES", "shape": [1, 1], "parameters": {"binary_data_size": len(name)}},
        {"name": "image", "datatype": "UINT8", "shape": [1, *image.shape],
         "parameters": {"binary_data_size": image.nbytes}}],
        "outputs": [{"name": "labels"}, {"name": "probs"}, {"name": "index"}]}).encode()
    return header + name + image.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def drive(url: str, tasks: list[str], requests_n: int, clients: int, seed: int) -> dict:
    """Closed-loop load; returns requests/s and latency percentiles (ms); every answer checked for its task."""
    import requests

    rng = random.Random(seed)
    image = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    jobs = [rng.choice(tasks) for _ in range(requests_n)]
    local = threading.local()
    latencies: list[float] = []
    failures = [0]

    def one(task: str) -> None:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        body, headers = _body(task, image)
        start = time.perf_counter()
        response = session.post(f"{url}/v2/models/rmt/infer", data=body, headers=headers, timeout=120)
        latencies.append((time.perf_counter() - start) * 1000)
        if response.status_code != 200 or not response.json()["outputs"][0]["data"]:
            failures[0] += 1

    for task in tasks * 2:  # warm-up: every replica process up, every task seen once
        one(task)
    latencies.clear()
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, jobs))
    elapsed = time.perf_counter() - start
    lat = np.array(latencies)
    return {"requests": requests_n, "failed": failures[0], "seconds": round(elapsed, 3),
            "requests_per_s": round(requests_n / elapsed, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2)}


def in_process(bundle: Path, tasks: list[str], requests_n: int, seed: int) -> dict:
    """The same requests through one in-process Engine (1 thread, cache_tasks 2): the model's own cost."""
    from rmt_deploy.runtime.engine import Engine

    rng = random.Random(seed)
    image = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    jobs = [rng.choice(tasks) for _ in range(requests_n)]
    with Engine.load(bundle, cache_tasks=2, threads=1) as engine:
        for task in tasks:
            engine.predict([image], task=task)
        start = time.perf_counter()
        for task in jobs:
            engine.predict([image], task=task)
        elapsed = time.perf_counter() - start
    return {"routing": "in-process Engine", "replicas": 0, "workload": f"{len(tasks)} tasks",
            "requests": requests_n, "failed": 0, "seconds": round(elapsed, 3),
            "requests_per_s": round(requests_n / elapsed, 1),
            "p50_ms": round(elapsed / requests_n * 1000, 2),  # one caller, one at a time: the mean, as p50
            "p99_ms": None, "resident_hit_share": None}


def measure_arm(bundle: Path, routing: str, replicas: int, tasks: list[str], args, port: int) -> dict:
    import requests
    from ray import serve

    from rmt_deploy.serving.ray import RayServeConfig, build_app

    config = RayServeConfig(bundle=str(bundle), replicas=replicas, cache_tasks=2, routing=routing,
                            replica_cpus=0.5, threads=1, top_k=3)
    serve.run(build_app(config), name="rmt", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    try:
        base = requests.get(f"{url}/v2/models/rmt/stats", timeout=60).json()["replicas"]
        before = {r["replica"]: r for r in base}
        result = drive(url, tasks, args.requests, args.clients, seed=len(tasks))
        after = requests.get(f"{url}/v2/models/rmt/stats", timeout=60).json()["replicas"]
        served = hits = 0
        per_replica = []
        for r in after:
            b = before.get(r["replica"], {"requests": 0, "resident_hits": 0})
            n, h = r["requests"] - b["requests"], r["resident_hits"] - b["resident_hits"]
            served, hits = served + n, hits + h
            per_replica.append({"requests": n, "resident_hits": h, "max_resident": r["max_resident"],
                                "pool_misses": r["pool"]["misses"]})
        result.update(routing=routing, replicas=replicas, workload=f"{len(tasks)} tasks",
                      resident_hit_share=round(hits / max(1, served), 3), per_replica=per_replica)
        return result
    finally:
        serve.delete("rmt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="rmt-small-vit")
    parser.add_argument("--zeros", type=float, default=0.025)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--cpus", type=float, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="keeps the bundle between runs")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="rmt-ray-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    bundle = prepare(args.model, args.zeros, work)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    load_before = os.getloadavg()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for workload, tasks in WORKLOADS.items():
            rows.append(in_process(bundle, tasks, args.requests, seed=len(tasks)))
            for routing, replicas in ARMS:
                row = measure_arm(bundle, routing, replicas, tasks, args, port)
                print(json.dumps({k: v for k, v in row.items() if k != "per_replica"}), flush=True)
                rows.append(row)
    finally:
        serve.shutdown()
        ray.shutdown()
    report = {
        "benchmark": "ray_serve", "model": args.model, "weights": "random (seeded)", "zeros": args.zeros,
        "tasks": len(TASKS), "cache_tasks": 2, "threads_per_replica": 1, "ray_cpus": args.cpus,
        "clients": args.clients, "requests_per_arm": args.requests, "image": "64x64 uint8, binary tensors",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                    "note": "2 cores shared with other jobs running at the same time: absolute figures are noisy"},
        "ray": ray.__version__, "results": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ray_serve.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"Ray Serve {ray.__version__}, {args.model} (random weights), {len(TASKS)} tasks, cache_tasks 2, "
             f"{args.clients} clients, {args.requests} requests per arm, Ray CPUs {args.cpus}; "
             f"load average before/after {load_before[0]:.1f}/{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
             f"{'workload':9} {'routing':17} {'replicas':>8} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
             f"{'resident hit':>12} {'failed':>6}"]
    for r in rows:
        hit = "-" if r["resident_hit_share"] is None else f"{r['resident_hit_share']:.1%}"
        lines.append(f"{r['workload']:9} {r['routing']:17} {r['replicas'] or '-':>8} {r['requests_per_s']:>7} "
                     f"{r['p50_ms']:>7} {r['p99_ms'] or '-':>7} {hit:>12} {r['failed']:>6}")
    (RESULTS / "ray_serve.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
