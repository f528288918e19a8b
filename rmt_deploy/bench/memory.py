"""Peak resident memory of one serving set-up, measured in a fresh process.

    python -m rmt_deploy.bench.memory --bundle B --variant shared --cache-tasks 1
    python -m rmt_deploy.bench.memory --bundle B --variant folded --tasks dtd

prints one JSON line: {"variant": ..., "peak_rss_mb": ..., "tasks": [...]}.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from typing import Any

import numpy as np

from rmt_deploy.errors import InputError


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB.

    On Linux this is VmHWM, the high-water mark of this process image: unlike
    getrusage's ru_maxrss it does not inherit the parent's peak across fork + exec.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


def measure(bundle: str, variant: str, tasks: list[str], cache_tasks: int, threads: int | None,
            backend: str = "auto", device: str = "cpu") -> dict[str, Any]:
    """Serve `tasks` one batch each in the chosen set-up, in this process; report peak RSS."""
    from rmt_deploy.artifacts.bundle import Bundle

    opened = Bundle.open(bundle)
    size = opened.manifest.preprocess.image_size
    batch = np.random.default_rng(0).standard_normal((1, 3, *size)).astype(np.float32)
    if variant == "shared":
        from rmt_deploy.runtime.engine import Engine

        with Engine.load(opened, backend=backend, device=device, cache_tasks=cache_tasks, threads=threads) as engine:
            for task in tasks or engine.tasks:
                engine.predict(batch, task=task)
            name = engine.backend
    elif variant == "folded":
        from rmt_deploy.bench.sessions import folded_session

        sessions = [folded_session(opened, task, threads) for task in tasks[:1]]
        for session in sessions:
            session.run(None, {session.get_inputs()[0].name: batch})
        name = "onnxruntime-cpu"
    else:
        raise InputError(f"memory variant {variant!r} is unknown: use shared or folded")
    return {"variant": variant, "backend": name, "tasks": tasks, "cache_tasks": cache_tasks,
            "peak_rss_mb": peak_rss_mb()}


def measure_in_subprocess(bundle: str, variant: str, tasks: list[str], cache_tasks: int = 1,
                          threads: int | None = None, backend: str = "auto", device: str = "cpu") -> dict[str, Any]:
    """Run `measure` in a fresh interpreter so each set-up's peak is its own."""
    command = [sys.executable, "-m", "rmt_deploy.bench.memory", "--bundle", str(bundle), "--variant", variant,
               "--tasks", ",".join(tasks), "--cache-tasks", str(cache_tasks), "--backend", backend,
               "--device", device]
    if threads is not None:
        command += ["--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise InputError(f"memory measurement ({variant}) failed: {last}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--tasks", default="")
    parser.add_argument("--cache-tasks", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    print(json.dumps(measure(args.bundle, args.variant, tasks, args.cache_tasks, args.threads,
                             args.backend, args.device)))


if __name__ == "__main__":
    _main(sys.argv[1:])
