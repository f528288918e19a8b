"""The backend contract: what the engine calls on a backend, and the device names backends accept."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from rmt_deploy.errors import InputError
from rmt_deploy.runtime.buffer_pool import Lease, TaskPool, TensorSpec

CUDA_EP = "CUDAExecutionProvider"


class Backend(Protocol):
    """What the engine needs of a backend: the masked tensors it is fed, their base values, and runs."""

    name: str                # e.g. 'onnxruntime-cpu', 'tensorrt', 'torch-cuda'
    concurrent: bool         # runs on different leases may overlap; if False the engine serialises them
    specs: list[TensorSpec]  # the masked tensors, under the keys and in the layout the backend is fed
    base_file: Path | None   # the bundle file the base values come from; None when they come from the model

    def fill_base(self, arrays: dict[str, np.ndarray]) -> str | None:
        """Write the base values into `arrays` (one per spec key); the sha256 of base_file as read, or None."""

    def attach_pool(self, pool: TaskPool, constant_sessions: int) -> None:
        """The pool whose leases `run` gets, for background work over its buffers (ONNX Runtime on CPU:
        a constant session for up to `constant_sessions` resident tasks)."""

    def wait_background(self, timeout: float | None) -> bool:
        """Wait for that background work to finish; False if `timeout` seconds passed first."""

    def prepare(self, lease: Lease) -> None:
        """Make the lease's weights current now (a device copy or refit), not on the next run."""

    def run(self, batch: np.ndarray, lease: Lease) -> np.ndarray:
        """The L2-normalised embeddings [N, D] of a float32 NCHW batch under the lease's weights."""

    def close(self) -> None:
        """Release the session, engine or model; the backend is not used again."""


class NoBackgroundWork:
    """attach_pool and wait_background for a backend that does no background work."""

    def attach_pool(self, pool: TaskPool, constant_sessions: int) -> None:
        return None

    def wait_background(self, timeout: float | None) -> bool:
        return True


def parse_device(device: str) -> tuple[str, int]:
    """'cpu', 'cuda' or 'cuda:N' -> (kind, index)."""
    text = str(device).strip().lower()
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise InputError(f"device {device!r} is not 'cpu', 'cuda' or 'cuda:N'")
    return kind, int(index or 0)
