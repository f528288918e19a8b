"""TensorRT engine files in a bundle: their names and whether one can run here.

Shared by export (which names and records engines) and the runtime (which picks one),
so neither imports the other. Pure functions: no tensorrt, no GPU, no torch.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

ENGINE_SUFFIX = ".plan"


def gpu_slug(gpu_name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200', for engine file names."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")
    return slug or "gpu"


def engine_file_name(stem: str, gpu_name: str) -> str:
    """`base` -> `base.nvidia-h200.plan`: an engine only runs on the GPU model it was built for."""
    return f"{stem}.{gpu_slug(gpu_name)}{ENGINE_SUFFIX}"


def engine_mismatch(meta: Mapping[str, Any], gpu_name: str, trt_version: str) -> str | None:
    """Why an engine recorded in a manifest cannot run here (None if it can): GPU model or TensorRT version.

    TensorRT plans (built without version compatibility) run only on the exact TensorRT
    version that built them, so the whole version string must match.
    """
    gpu = meta.get("gpu") if isinstance(meta, Mapping) else None
    built_gpu = gpu.get("name") if isinstance(gpu, Mapping) else None
    if built_gpu != gpu_name:
        return f"engine was built for GPU {built_gpu!r}, this GPU is {gpu_name!r}: re-export with --target trt here"
    built_version = str(meta.get("version", "")) if isinstance(meta, Mapping) else ""
    if built_version.strip() != str(trt_version).strip():
        return (f"engine was built with TensorRT {built_version or '(unknown)'}, this is TensorRT {trt_version}: "
                "re-export with --target trt on this machine")
    return None
