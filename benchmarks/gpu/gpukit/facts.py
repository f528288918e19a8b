"""What the machine has: GPU (nvidia-smi), Python, torch and CUDA, ONNX Runtime providers, TensorRT,
cuda-python, and where open_clip and the other carried packages were imported from."""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from typing import Any

from gpukit.common import PASS, Context, first_line, result

PACKAGES = ("rmt-deploy", "torch", "torchvision", "open_clip_torch", "timm", "ftfy", "wcwidth", "regex",
            "huggingface_hub", "numpy", "safetensors", "onnx", "onnx-ir", "onnxscript", "onnxruntime",
            "onnxruntime-gpu", "tensorrt", "cuda-python", "cuda-bindings", "pytest", "Pillow", "click")


def _run(cmd: list[str], timeout: float = 20) -> str:
    if shutil.which(cmd[0]) is None:
        return f"({cmd[0]} not found)"
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return f"({' '.join(cmd)} timed out after {timeout:.0f} s)"
    return (done.stdout + done.stderr).strip()


def _versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _origin(module: str) -> str | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec else None


def tree_digest(repo: Any) -> str:
    """sha256 over the package's Python files (path + bytes): which code a result came from."""
    digest = hashlib.sha256()
    for path in sorted((repo / "rmt_deploy").rglob("*.py")):
        digest.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _torch_facts() -> dict[str, Any]:
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        return {"import_error": first_line(exc)}
    facts: dict[str, Any] = {"version": torch.__version__, "cuda": torch.version.cuda,
                             "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                             "cuda_available": torch.cuda.is_available(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(device=props.name, capability=f"{props.major}.{props.minor}",
                     memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                     device_count=torch.cuda.device_count(), bf16=bool(torch.cuda.is_bf16_supported()))
    return facts


def _ort_facts() -> dict[str, Any]:
    try:
        import onnxruntime as ort
    except Exception as exc:  # noqa: BLE001
        return {"import_error": first_line(exc)}
    return {"version": ort.__version__, "providers": list(ort.get_available_providers()),
            "device": ort.get_device()}


def _trt_facts() -> dict[str, Any]:
    try:
        import tensorrt as trt
    except Exception as exc:  # noqa: BLE001
        return {"imports": False, "error": first_line(exc)}
    return {"imports": True, "version": str(trt.__version__)}


def _cudart_facts() -> dict[str, Any]:
    try:
        from rmt_deploy.runtime.backends.tensorrt import _import_cudart, gpu_name

        _import_cudart()
    except Exception as exc:  # noqa: BLE001
        return {"imports": False, "error": first_line(exc)}
    return {"imports": True, "gpu_name": gpu_name(0)}


def run(ctx: Context) -> dict[str, Any]:
    smi = _run(["nvidia-smi"])
    fields = ("name,memory.total,driver_version,clocks.max.sm,clocks.max.mem,power.limit,pcie.link.gen.max,"
              "pcie.link.width.max")
    query = _run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"])
    versions = _versions()
    facts = {
        "host": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform(),
        "python": sys.version.split()[0], "python_executable": sys.executable,
        "nvidia_smi": query, "torch": _torch_facts(), "onnxruntime": _ort_facts(), "tensorrt": _trt_facts(),
        "cuda_python": _cudart_facts(), "packages": versions,
        "imported_from": {m: _origin(m) for m in ("rmt_deploy", "open_clip", "timm", "ftfy", "torch")},
        "rmt_deploy_tree": tree_digest(ctx.repo), "pythonpath": os.environ.get("PYTHONPATH", ""),
    }
    pip = _run([sys.executable, "-m", "pip", "list", "--format=freeze"], timeout=60)
    report = "\n\n".join([f"$ nvidia-smi\n{smi}", f"$ nvidia-smi --query-gpu=...\n{query}",
                          f"$ {sys.executable} -m pip list --format=freeze\n{pip}"]) + "\n"
    torch_facts = facts["torch"]
    gpu = torch_facts.get("device") or "no CUDA device"
    reason = (f"{gpu}; torch {torch_facts.get('version', '-')} (CUDA {torch_facts.get('cuda')}); "
              f"onnxruntime {facts['onnxruntime'].get('version', '-')} {facts['onnxruntime'].get('providers', [])}; "
              f"tensorrt {'imports' if facts['tensorrt']['imports'] else 'does not import'}")
    return result(PASS, reason, report=report, **facts)
