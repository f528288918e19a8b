"""What the checks share: their context, results, timers and the ViT-B/16 sizes they compare against."""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PASS, FAIL, SKIPPED = "pass", "fail", "skipped"
STATUSES = (PASS, FAIL, SKIPPED)
TINY_MODEL = "rmt-tiny-vit"  # the dry run's model: 32 px, seconds on a CPU
GPU_MODEL = "ViT-B-16"       # 28.3 M masked weights (attn group) = 113 MB in fp32


@dataclass
class Context:
    """What a check is told: where it runs and on what."""

    device: str          # "cuda" (a real run) or "cpu" (a dry run's CPU part)
    work: Path           # scratch folder shared by the checks of one run (checkpoints, bundles)
    repo: Path           # the repository root
    model: str           # ViT-B-16 on CUDA, rmt-tiny-vit in a dry run
    trt_model: str       # the model the TensorRT check builds engines of
    log: Callable[[str], None] = print

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def reps(self) -> int:
        """Timed repetitions per figure: few on a CPU (the dry run proves the code, not the speed)."""
        return 20 if self.cuda else 2


def result(status: str, reason: str, **figures: Any) -> dict[str, Any]:
    if status not in STATUSES:
        raise ValueError(f"status {status!r}")
    if not reason:
        raise ValueError("a result needs a reason")
    return {"status": status, "reason": reason, "figures": figures}


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def wall_ms(fn: Callable[[], Any], reps: int, warmup: int = 1) -> list[float]:
    """Wall-clock milliseconds of `fn` (which must wait for its own device work) per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def cuda_event_ms(torch: Any, fn: Callable[[], Any], reps: int, warmup: int = 3) -> list[float]:
    """Device milliseconds of `fn` per call, by CUDA events around each call on the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(float(start.elapsed_time(end)))
    return times


def interleaved_ms(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall milliseconds of several functions, run in turn each repetition (load drift hits all alike)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def rel_l2(test: Any, reference: Any) -> float:
    import numpy as np

    test, reference = np.asarray(test, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(test - reference) / max(np.linalg.norm(reference), 1e-30))


def size_text(nbytes: int) -> str:
    return f"{nbytes / 1e6:.0f} MB" if nbytes >= 10e6 else f"{nbytes / 1e3:.0f} kB"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def import_error(module: str) -> str | None:
    """None if `module` imports, else why not (one line)."""
    import importlib

    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - a missing module, or a native library that does not load
        return first_line(exc)
    return None


def round_figures(value: Any, digits: int = 4) -> Any:
    """Floats rounded to `digits` significant digits, recursively (results.json stays readable)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: round_figures(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [round_figures(v, digits) for v in value]
    return value
