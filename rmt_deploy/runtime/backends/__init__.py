"""Backends run the shared image encoder on a leased set of masked weights.

A backend exposes `specs` (the masked tensors under the keys it is fed by),
`read_base(spec, out)` (the base values, read once into the pool's first buffer),
`run(batch, lease) -> embeddings` and `close()`. `concurrent` says whether runs on
different leases may overlap; if not, the engine serialises them.
Each backend module imports its library lazily; asking for a missing one raises
MissingDependencyError naming the extra.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Protocol

import numpy as np

from rmt_deploy.bundle import Bundle
from rmt_deploy.errors import InputError, MissingDependencyError
from rmt_deploy.runtime.taskpool import Lease, TensorSpec

BACKENDS = ("auto", "onnxruntime", "torch", "tensorrt")


class Backend(Protocol):
    name: str
    concurrent: bool
    specs: list[TensorSpec]

    def read_base(self, spec: TensorSpec, out: np.ndarray) -> None: ...

    def run(self, batch: np.ndarray, lease: Lease) -> np.ndarray: ...

    def close(self) -> None: ...


def parse_device(device: str) -> tuple[str, int]:
    """'cpu', 'cuda' or 'cuda:N' -> (kind, index)."""
    text = str(device).strip().lower()
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise InputError(f"device {device!r} is not 'cpu', 'cuda' or 'cuda:N'")
    return kind, int(index or 0)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def choose(bundle: Bundle, backend: str, device: str) -> str:
    """Resolve 'auto': TensorRT (engine for this GPU), else ORT (CUDA EP on cuda), else torch."""
    if backend not in BACKENDS:
        raise InputError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    kind, index = parse_device(device)
    if backend != "auto":
        return backend
    if kind == "cuda" and _installed("tensorrt"):
        from rmt_deploy.runtime.backends import tensorrt as trt_backend

        if trt_backend.engine_for_device(bundle, index) is not None:
            return "tensorrt"
    if "onnx" in bundle.manifest.files and _installed("onnxruntime"):
        if kind == "cpu":
            return "onnxruntime"
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            return "onnxruntime"
    if _installed("torch") and _installed("open_clip"):
        return "torch"
    raise MissingDependencyError(
        f"no backend can run this bundle on {device}: install onnxruntime "
        "(pip install 'rmt-deploy[onnx]', or '[gpu]' for CUDA) or torch ('rmt-deploy[train]')"
    )


def create(bundle: Bundle, backend: str, device: str, threads: int | None) -> Any:
    """Build the backend object for a resolved backend name."""
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise InputError(f"threads={threads!r} must be a positive integer or None")
    name = choose(bundle, backend, device)
    if name == "onnxruntime":
        from rmt_deploy.runtime.backends.onnxruntime import OrtBackend as cls
    elif name == "torch":
        from rmt_deploy.runtime.backends.torch import TorchBackend as cls
    else:
        from rmt_deploy.runtime.backends.tensorrt import TensorRTBackend as cls
    return cls(bundle, device, threads)
