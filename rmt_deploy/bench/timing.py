"""Timing helpers: interleaved repeats and percentile summaries."""
from __future__ import annotations

import time
from typing import Callable, Mapping

import numpy as np


def time_call(fn: Callable[[], object]) -> float:
    """Seconds one call of fn takes (perf_counter)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1,
                tick: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Time each fn `repeats` times, one call of each per round, so load drifts hit all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_call(fn))
        if tick is not None:
            tick()
    return times


def summarize_ms(seconds: list[float]) -> dict[str, float]:
    """p50 / p90 / p99 / mean / min in milliseconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "mean": float(ms.mean()),
        "min": float(ms.min()),
        "n": int(ms.size),
    }
