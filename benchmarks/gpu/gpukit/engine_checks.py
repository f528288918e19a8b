"""Measurements every runtime check makes on an Engine: switch times (uncached: one buffer, each switch
rewrites it; cached: two buffers, a switch rebinds), A -> B -> A exactness, logits against a reference
per task, and predict latency against that reference."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from gpukit.common import interleaved_ms, median, rel_l2, wall_ms


def _switch_ms(engine: Any, order: list[str], reps: int) -> list[float]:
    tasks = iter(order * (reps + 4))
    return wall_ms(lambda: engine.switch(next(tasks)), reps, warmup=2)


def switching(load: Callable[[int], Any], a: str, b: str, batch: np.ndarray, reps: int,
              then: Callable[[Any], tuple[dict, list[str]]] | None = None) -> tuple[dict, list[str]]:
    """`load(cache_tasks)` opens an Engine. Returns (figures, failures); `then(engine)` runs on the
    two-buffer engine before it closes and adds its own (figures, failures)."""
    figures: dict[str, Any] = {}
    failures: list[str] = []
    with load(1) as engine:
        figures["backend"] = engine.backend
        first = engine.predict(batch, task=a).logits
        repeat = engine.predict(batch, task=a).logits  # is a run bit-reproducible here at all?
        engine.switch(b)
        engine.predict(batch, task=b)
        engine.switch(a)
        again = engine.predict(batch, task=a).logits
        noise = float(np.abs(first - repeat).max())
        figures["deterministic"] = noise == 0.0
        figures["a_b_a_bit_exact"] = bool(np.array_equal(first, again))
        figures["a_b_a_max_abs_diff"] = float(np.abs(first - again).max())
        if figures["a_b_a_max_abs_diff"] > noise:
            failures.append(f"A -> B -> A changed A's logits (max |diff| {figures['a_b_a_max_abs_diff']:.3g}, "
                            f"run-to-run {noise:.3g})")
        uncached = _switch_ms(engine, [b, a], reps)
        figures["uncached_switch_ms"] = median(uncached)
        figures["uncached_switch_ms_all"] = uncached
        figures["cache_stats_uncached"] = engine.cache_stats
    with load(2) as engine:
        engine.switch(b)
        engine.switch(a)
        figures["cached_switch_ms"] = median(_switch_ms(engine, [b, a], reps))
        figures["cache_stats_cached"] = engine.cache_stats
        if then is not None:
            more, bad = then(engine)
            figures.update(more)
            failures += bad
    return figures, failures


def against(engine: Any, reference: Callable[[str, np.ndarray], np.ndarray], tasks: list[str], batch: np.ndarray,
            rtol: float, atol: float, what: str) -> tuple[dict, list[str]]:
    """Engine logits vs `reference(task, batch)` for each task in turn (switching between them)."""
    checks, failures = {}, []
    for step, task in enumerate(tasks):
        engine.switch(task)
        got, want = engine.predict(batch, task=task).logits, reference(task, batch)
        entry = {"task": task, "rel_l2": rel_l2(got, want), "max_abs": float(np.abs(got - want).max()),
                 "allclose": bool(np.allclose(got, want, rtol=rtol, atol=atol))}
        checks[f"{step}_{task}"] = entry
        if not entry["allclose"]:
            failures.append(f"task {task}: engine logits differ from {what} (max |diff| {entry['max_abs']:.3g}, "
                            f"rel L2 {entry['rel_l2']:.3g}; rtol {rtol}, atol {atol})")
    return {"tolerance": {"rtol": rtol, "atol": atol}, "checks": checks}, failures


def latency(engine: Any, reference: Callable[[str, np.ndarray], np.ndarray], task: str, batch: np.ndarray,
            sizes: list[int], reps: int) -> dict[str, Any]:
    """Median wall ms of engine.predict and of the reference at each batch size, interleaved."""
    engine.switch(task)
    out = {}
    for n in sorted(set(sizes)):
        x = batch[:n]
        times = interleaved_ms({"engine": lambda x=x: engine.predict(x, task=task),
                                "reference": lambda x=x: reference(task, x)}, reps, warmup=2)
        e, r = median(times["engine"]), median(times["reference"])
        out[f"batch_{n}"] = {"engine_ms": e, "reference_ms": r, "ratio": e / r}
    return out


def versus_folded(reference: Callable[[str, np.ndarray], np.ndarray], a: str, b: str, batch: np.ndarray,
                  max_batch: int, reps: int, tol: float, what: str,
                  log: Callable[[str], None]) -> Callable[[Any], tuple[dict, list[str]]]:
    """The `then` of `switching` for a check against folded models: logits over A -> B -> A, then latency."""
    def compare(engine: Any) -> tuple[dict, list[str]]:
        checked, bad = against(engine, reference, [a, b, a], batch, tol, tol, what)
        log(f"vs {what}: {checked}")
        return {"vs_folded": checked, "predict": latency(engine, reference, a, batch, [1, max_batch], reps)}, bad

    return compare
