"""Backends run the shared image encoder on a leased set of masked weights.

`Backend` (backends.contract) is what the engine relies on; `BACKEND_CLASSES` names the implementation of
each backend (onnxruntime, tensorrt, torch), `choose` picks one for a bundle and a device and
`create` builds it. Each backend module imports its library lazily; asking for a missing one
raises MissingDependencyError naming the extra.
"""
from __future__ import annotations

import importlib
import importlib.util
import warnings

from rmt_deploy.artifacts.bundle import Bundle
from rmt_deploy.errors import InputError, MissingDependencyError
from rmt_deploy.runtime.backends.contract import CUDA_EP, Backend, parse_device

__all__ = ["AUTO", "BACKENDS", "BACKEND_CLASSES", "CUDA_EP", "Backend", "choose", "create", "parse_device"]

AUTO = "auto"


BACKEND_CLASSES = {  # backend name -> (module, class); imported only when chosen
    "onnxruntime": ("rmt_deploy.runtime.backends.onnxruntime", "OrtBackend"),
    "torch": ("rmt_deploy.runtime.backends.torch", "TorchBackend"),
    "tensorrt": ("rmt_deploy.runtime.backends.tensorrt", "TensorRTBackend"),
}
BACKENDS = (AUTO, *BACKEND_CLASSES)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# ---- availability probes: one per backend, never raising; tests replace them ----

def _tensorrt_engine(bundle: Bundle, index: int) -> bool:
    """The bundle has an engine for GPU `index` and this TensorRT, and tensorrt + cuda-python load."""
    from rmt_deploy.runtime.backends.tensorrt import engine_for_device

    return engine_for_device(bundle, index) is not None


def _ort_providers() -> list[str]:
    """ONNX Runtime's execution providers; [] when it is not installed or does not load."""
    if not _installed("onnxruntime"):
        return []
    try:
        import onnxruntime
    except Exception:  # noqa: BLE001 - a broken native install (missing library) counts as absent
        return []
    return list(onnxruntime.get_available_providers())


def _torch_runs() -> bool:
    return _installed("torch") and _installed("open_clip")


def _torch_cuda() -> bool:
    """torch and open_clip are installed and torch sees a CUDA device (imports torch: probed last)."""
    if not _torch_runs():
        return False
    try:
        import torch
    except Exception:  # noqa: BLE001 - as for onnxruntime
        return False
    return bool(torch.cuda.is_available())


def _shared_onnx(bundle: Bundle) -> bool:
    files = bundle.manifest.files.get("onnx")
    return isinstance(files, dict) and bool(files.get("base"))


def _auto_cuda(bundle: Bundle, index: int) -> str | None:
    if _tensorrt_engine(bundle, index):
        return "tensorrt"
    if _shared_onnx(bundle) and CUDA_EP in _ort_providers():
        return "onnxruntime"
    if _torch_cuda():
        return "torch"
    return None


def _auto_cpu(bundle: Bundle) -> str | None:
    if _shared_onnx(bundle) and _ort_providers():
        return "onnxruntime"
    return "torch" if _torch_runs() else None


def choose(bundle: Bundle, backend: str, device: str) -> tuple[str, str]:
    """Resolve (backend, device). An explicit backend runs on `device` or fails saying why.

    'auto' on 'cuda[:N]': TensorRT (the bundle has an engine for this GPU and tensorrt loads),
    else ONNX Runtime with its CUDA provider, else torch on CUDA (honours the device where ORT
    cannot), else the CPU order below, with a RuntimeWarning. 'auto' on 'cpu': ONNX Runtime,
    else torch. The ONNX Runtime choices need the bundle's shared base.onnx.
    """
    if backend != AUTO and backend not in BACKEND_CLASSES:
        raise InputError(f"backend {backend!r} is not one of {', '.join([AUTO, *BACKEND_CLASSES])}")
    kind, index = parse_device(device)
    if backend != AUTO:
        return backend, device
    if kind == "cuda":
        name = _auto_cuda(bundle, index)
        if name is not None:
            return name, device
        warnings.warn(f"device {device!r}: no backend here runs on CUDA (no TensorRT engine for this GPU, no "
                      "onnxruntime CUDA provider, no CUDA torch); running on the CPU. Install "
                      "'rmt-deploy[gpu]' or pass device='cpu'", RuntimeWarning, stacklevel=4)  # the Engine.load caller
    name = _auto_cpu(bundle)
    if name is not None:
        return name, "cpu"
    raise MissingDependencyError(
        f"no backend can run this bundle on {device}: install onnxruntime "
        "(pip install 'rmt-deploy[onnx]', or '[gpu]' for CUDA) or torch ('rmt-deploy[train]')"
    )


def create(bundle: Bundle, backend: str, device: str, threads: int | None) -> Backend:
    """Build the backend object that `choose` picks."""
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise InputError(f"threads={threads!r} must be a positive integer or None")
    name, device = choose(bundle, backend, device)
    module, cls = BACKEND_CLASSES[name]
    return getattr(importlib.import_module(module), cls)(bundle, device, threads)
