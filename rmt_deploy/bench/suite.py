"""The benchmark suite: latency per variant and batch size, switch times, load, memory, disk.

Variants: `shared:<task>` (one Engine serving every task from the shared base),
`folded:<task>` (a plain ONNX Runtime session on the task's folded model) and
`base` (the shared engine with the unmasked base weights). All variants are
timed interleaved in one run so machine load hits them alike.
"""
from __future__ import annotations

import datetime
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rmt_deploy import __version__
from rmt_deploy.artifacts.bundle import Bundle
from rmt_deploy.artifacts.heads import head_nbytes
from rmt_deploy.bench.memory import measure_in_subprocess
from rmt_deploy.bench.sessions import folded_session
from rmt_deploy.bench.timing import interleaved, summarize_ms, time_call
from rmt_deploy.errors import InputError, InternalError

SCHEMA_ID = "rmt-deploy.bench/1"
SESSIONS_TIMEOUT_S = 300  # how long the warm-up waits for the constant sessions to be made


@dataclass
class BenchConfig:
    """What to measure; defaults suit a small model on a CPU."""

    bundle: Path
    backend: str = "auto"
    device: str = "cpu"
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32])
    tasks: list[str] | None = None
    repeats: int = 20
    threads: int | None = None
    memory: bool = True

    def validate(self, bundle: Bundle) -> list[str]:
        """Check the settings against the bundle; return the tasks to measure."""
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise InputError(f"batch sizes {self.batch_sizes} must be positive integers, e.g. 1,8,32")
        if self.repeats < 1:
            raise InputError(f"repeats {self.repeats} must be at least 1")
        tasks = self.tasks or bundle.tasks
        if not tasks:
            raise InputError(f"bundle {bundle.root} has no tasks to measure; export it with --task")
        for task in tasks:
            bundle.task_path(task)
        return list(tasks)


def _machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version()}


def _versions() -> dict[str, str]:
    versions = {"rmt_deploy": __version__, "numpy": np.__version__}
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return versions


def _disk(bundle: Bundle, tasks: list[str]) -> dict[str, Any]:
    files = bundle.manifest.files.get("onnx", {})
    names = [files.get("base"), getattr(bundle.manifest, "base_weights", None)]
    shared = [bundle.root / name for name in names if isinstance(name, str) and name]
    shared += [p.with_name(p.name + ".data") for p in shared if p.with_name(p.name + ".data").exists()]
    folded = files.get("folded", {})
    per_task = {}
    for task in tasks:
        encoded = bundle.read_task(task)
        entry = {"rmtask_bytes": bundle.task_path(task).stat().st_size, "head_kind": encoded.head_kind,
                 "head_bytes": head_nbytes(encoded.head, encoded.cache)}
        if task in folded:
            entry["folded_bytes"] = (bundle.root / folded[task]).stat().st_size
        per_task[task] = entry
    return {"shared_base_bytes": sum(p.stat().st_size for p in shared if p.exists()), "tasks": per_task}


class _Runner:
    """Holds the engine and folded sessions for one run of the suite."""

    def __init__(self, config: BenchConfig, bundle: Bundle, tasks: list[str], tick: Callable[[], None]):
        from rmt_deploy.runtime.engine import Engine

        self.config, self.bundle, self.tasks, self.tick = config, bundle, tasks, tick
        size = bundle.manifest.preprocess.image_size
        self.rng = np.random.default_rng(0)
        self.image_shape = (3, *size)
        self.load_s = time_call(lambda: setattr(self, "engine", Engine.load(
            bundle, backend=config.backend, device=config.device, cache_tasks=len(tasks) + 1,
            threads=config.threads, constant_sessions=len(tasks))))
        # every task and the base stay resident, each task with its constant session: latency is steady state
        self._settle()
        self.has_folded = all(t in bundle.manifest.files.get("onnx", {}).get("folded", {}) for t in tasks)
        self.folded: dict[str, Any] = {}
        self.folded_load_s: dict[str, float] = {}
        if self.has_folded:
            for task in tasks:
                self.folded_load_s[task] = time_call(
                    lambda t=task: self.folded.__setitem__(t, folded_session(bundle, t, config.threads)))

    def _settle(self) -> None:
        """Serve each task until its constant session is asked for, then wait for them all: latency is timed
        in the steady state, each task resident with its session."""
        from rmt_deploy.runtime.backends.constant_sessions import ASK_AFTER_USES

        image = self.batch(1)
        for task in self.tasks:
            for _ in range(ASK_AFTER_USES):
                self.engine.predict(image, task=task)
        if not self.engine.wait_ready(SESSIONS_TIMEOUT_S):
            raise InternalError(f"constant sessions not made within {SESSIONS_TIMEOUT_S} s")

    def batch(self, size: int) -> np.ndarray:
        return self.rng.standard_normal((size, *self.image_shape)).astype(np.float32)

    def latency(self) -> list[dict[str, Any]]:
        from rmt_deploy.runtime.buffer_pool import BASE

        rows = []
        for size in self.config.batch_sizes:
            batch = self.batch(size)
            fns: dict[str, Callable[[], object]] = {}
            for task in self.tasks:
                fns[f"shared:{task}"] = lambda t=task: self.engine.predict(batch, task=t)
                if self.has_folded:
                    session = self.folded[task]
                    feed = {session.get_inputs()[0].name: batch}
                    fns[f"folded:{task}"] = lambda s=session, f=feed: s.run(None, f)
            fns["base"] = lambda: self.engine.embed(batch, BASE)
            for fn in fns.values():  # warm-up
                fn()
            misses = self.engine.cache_stats["misses"]
            timed = interleaved(fns, self.config.repeats, warmup=0, tick=self.tick)
            if self.engine.cache_stats["misses"] != misses:
                raise InternalError("bench latency runs rewrote a task buffer: every task should stay resident")
            for variant, times in timed.items():
                stats = summarize_ms(times)
                rows.append({"variant": variant, "kind": variant.split(":")[0], "batch": size, **stats,
                             "images_per_s": size / (stats["p50"] / 1e3)})
        return rows

    def switches(self) -> dict[str, Any]:
        from rmt_deploy.runtime.engine import Engine

        repeats = self.config.repeats
        result: dict[str, Any] = {}
        pair = self.tasks[:2] if len(self.tasks) >= 2 else None
        if pair:
            a, b = pair
            result["cached_ms"] = summarize_ms([time_call(lambda t=(a, b)[i % 2]: self.engine.switch(t))
                                                for i in range(2 * repeats)])
            with Engine.load(self.bundle, backend=self.config.backend, device=self.config.device,
                             cache_tasks=1, threads=self.config.threads) as single:
                result["uncached_ms"] = summarize_ms([time_call(lambda t=(a, b)[i % 2]: single.switch(t))
                                                      for i in range(2 * repeats)])
        if self.has_folded:
            task = self.tasks[0]
            result["naive_ms"] = summarize_ms([time_call(lambda: folded_session(self.bundle, task,
                                                                                self.config.threads))
                                               for _ in range(max(3, repeats // 4))])
        self.tick()
        return result

    def close(self) -> None:
        self.sessions = self.engine.session_stats  # as timed: constant sessions made, or why they are off
        self.engine.close()
        self.folded.clear()


def run_bench(config: BenchConfig, progress: bool = True) -> dict[str, Any]:
    """Measure a bundle; return the results as a JSON-able dict (schema rmt-deploy.bench/1)."""
    from tqdm import tqdm

    bundle = Bundle.open(config.bundle)
    tasks = config.validate(bundle)
    steps = len(config.batch_sizes) * config.repeats + 1 + (2 if config.memory else 0)
    with tqdm(total=steps, desc="bench", disable=not progress, leave=False) as bar:
        runner = _Runner(config, bundle, tasks, lambda: bar.update(1))
        try:
            latency = runner.latency()
            switch = runner.switches()
        finally:
            runner.close()
        memory = _memory(config, tasks, runner.has_folded, lambda: bar.update(1)) if config.memory else None
    return {
        "schema": SCHEMA_ID,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "versions": _versions(),
        "bundle": {"path": str(bundle.root), "model": bundle.manifest.model_name,
                   "fingerprint": bundle.manifest.fingerprint, "precision": bundle.manifest.precision,
                   "tasks": tasks},
        "config": {**asdict(config), "bundle": str(config.bundle)},
        "backend": runner.engine.backend,
        "sessions": runner.sessions,
        "latency": latency,
        "load_s": {"shared_engine": runner.load_s, "folded_sessions": runner.folded_load_s},
        "switch": switch,
        "memory": memory,
        "disk": _disk(bundle, tasks),
    }


def _memory(config: BenchConfig, tasks: list[str], has_folded: bool, tick: Callable[[], None]) -> dict[str, Any]:
    shared = measure_in_subprocess(str(config.bundle), "shared", tasks, 1, config.threads, config.backend,
                                   config.device)
    tick()
    result: dict[str, Any] = {"shared_cache1_mb": shared["peak_rss_mb"], "tasks": len(tasks)}
    if has_folded:
        folded = measure_in_subprocess(str(config.bundle), "folded", tasks[:1], 1, config.threads)
        result["folded_one_session_mb"] = folded["peak_rss_mb"]
        result["shared_over_folded"] = shared["peak_rss_mb"] / folded["peak_rss_mb"]
    tick()
    return result

