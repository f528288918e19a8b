"""Backend selection: 'auto' follows TensorRT > ORT-CUDA > torch-CUDA > CPU on cuda, ORT > torch on cpu.

The availability probes are replaced, so every branch runs on a machine without a GPU.
"""
from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from rmt_deploy.errors import MissingDependencyError
from rmt_deploy.runtime import backends
from rmt_deploy.runtime.backends import tensorrt as trt_backend

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def _bundle(onnx: bool = True, trt: bool = False):
    files = {"onnx": {"base": "base.onnx"}} if onnx else {"onnx": {"folded": {"a": "folded/a.onnx"}}}
    if trt:
        files["tensorrt"] = {"base": "base.nvidia-h200.plan"}
    meta = {"version": "10.8.0", "gpu": {"name": "NVIDIA H200"}}
    return SimpleNamespace(manifest=SimpleNamespace(files=files, tensorrt=meta), root=None)


@pytest.fixture
def probes(monkeypatch):
    """probes(trt=..., ort=[...], torch_cuda=..., torch=...) sets what each backend reports."""
    seen = {}

    def set_probes(trt=False, ort=(CPU,), torch_cuda=False, torch=True):
        def trt_probe(bundle, index):
            seen["trt_index"] = index
            return trt

        def torch_cuda_probe():
            seen["torch_cuda_probed"] = True
            return torch_cuda

        monkeypatch.setattr(backends, "_tensorrt_engine", trt_probe)
        monkeypatch.setattr(backends, "_ort_providers", lambda: list(ort))
        monkeypatch.setattr(backends, "_torch_cuda", torch_cuda_probe)
        monkeypatch.setattr(backends, "_torch_runs", lambda: torch)
        return seen

    return set_probes


@pytest.mark.parametrize("available, expected", [
    ({"trt": True, "ort": (CUDA, CPU), "torch_cuda": True}, ("tensorrt", "cuda:1")),
    ({"ort": (CUDA, CPU), "torch_cuda": True}, ("onnxruntime", "cuda:1")),
    ({"ort": (CPU,), "torch_cuda": True}, ("torch", "cuda:1")),  # torch honours the device ORT cannot
    ({"ort": (), "torch_cuda": True}, ("torch", "cuda:1")),
])
def test_auto_on_cuda_prefers_backends_that_run_on_the_gpu(probes, available, expected):
    seen = probes(**available)
    assert backends.choose(_bundle(), "auto", "cuda:1") == expected
    assert seen["trt_index"] == 1


@pytest.mark.parametrize("available, expected", [
    ({"ort": (CPU,)}, ("onnxruntime", "cpu")),
    ({"ort": ()}, ("torch", "cpu")),
])
def test_auto_on_cuda_without_any_cuda_backend_warns_and_runs_on_cpu(probes, available, expected):
    probes(**available)
    with pytest.warns(RuntimeWarning, match="no backend here runs on CUDA.*device='cpu'"):
        assert backends.choose(_bundle(), "auto", "cuda") == expected


def test_auto_on_cpu_is_onnxruntime_then_torch_and_never_probes_cuda(probes):
    seen = probes(trt=True, ort=(CUDA, CPU), torch_cuda=True)
    assert backends.choose(_bundle(), "auto", "cpu") == ("onnxruntime", "cpu")
    assert backends.choose(_bundle(onnx=False), "auto", "cpu") == ("torch", "cpu")  # no shared base.onnx
    probes(ort=())
    assert backends.choose(_bundle(), "auto", "cpu") == ("torch", "cpu")
    assert not seen.get("torch_cuda_probed") and "trt_index" not in seen


def test_auto_with_no_backend_names_the_extras(probes):
    probes(ort=(), torch=False)
    with pytest.raises(MissingDependencyError, match=r"rmt-deploy\[onnx\].*rmt-deploy\[train\]"):
        backends.choose(_bundle(), "auto", "cpu")


def test_an_explicit_backend_keeps_the_requested_device(probes):
    probes(ort=())
    assert backends.choose(_bundle(), "onnxruntime", "cuda:0") == ("onnxruntime", "cuda:0")
    assert backends.choose(_bundle(), "tensorrt", "cuda") == ("tensorrt", "cuda")


@pytest.fixture
def broken_tensorrt(tmp_path, monkeypatch):
    """A `tensorrt` package whose import fails with OSError, as when libnvinfer is missing."""
    package = tmp_path / "fake" / "tensorrt"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "raise OSError('libnvinfer.so.10: cannot open shared object file: No such file or directory')\n")
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    monkeypatch.setattr(trt_backend, "gpu_name", lambda index: "NVIDIA H200")


def test_tensorrt_that_fails_to_load_is_unavailable_for_auto(broken_tensorrt, monkeypatch):
    monkeypatch.setattr(backends, "_ort_providers", lambda: [CUDA, CPU])
    bundle = _bundle(trt=True)
    assert trt_backend.engine_for_device(bundle, 0) is None
    assert backends.choose(bundle, "auto", "cuda") == ("onnxruntime", "cuda")


def test_tensorrt_that_fails_to_load_asked_for_explicitly_is_a_missing_dependency(broken_tensorrt, onnx_bundle):
    from rmt_deploy.runtime.engine import Engine

    with pytest.raises(MissingDependencyError, match=r"OSError: libnvinfer.*rmt-deploy\[trt\]"):
        trt_backend._import_tensorrt()
    with pytest.raises(MissingDependencyError, match="TensorRT is not installed or does not load"):
        Engine.load(onnx_bundle, backend="tensorrt", device="cuda")


@pytest.mark.parametrize("name", sorted(backends.BACKEND_CLASSES))
def test_every_backend_implements_the_whole_contract(name):
    """Each backend class defines every method of backends.Backend with the same parameters."""
    import importlib
    import inspect

    module, cls_name = backends.BACKEND_CLASSES[name]
    cls = getattr(importlib.import_module(module), cls_name)
    methods = [m for m, v in vars(backends.Backend).items() if inspect.isfunction(v) and not m.startswith("_")]
    assert set(methods) == {"fill_base", "attach_pool", "wait_background", "prepare", "run", "close"}
    for method in methods:  # defined by the class or a base it names (contract.NoBackgroundWork)
        assert any(method in vars(k) for k in cls.__mro__ if k is not object), f"{cls_name} does not define {method}"
        want = list(inspect.signature(getattr(backends.Backend, method)).parameters)
        assert list(inspect.signature(getattr(cls, method)).parameters) == want, (cls_name, method)
    assert isinstance(vars(cls).get("concurrent"), bool), f"{cls_name}.concurrent is not declared"
