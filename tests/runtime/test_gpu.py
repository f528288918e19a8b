"""GPU backends: TensorRT (refit switching, checked against folded engines) and torch on CUDA.

The GPU tests skip with the reason when TensorRT, cuda-python or a CUDA device is missing.
The TensorRT backend's pure parts (refit specs, transposed base reads, engine I/O checks)
run on CPU.
"""
from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from rmt_deploy.errors import ArtifactError
from rmt_deploy.runtime.backends import tensorrt as trt_backend
from rmt_deploy.runtime.engine import Engine


def _cuda_torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible to torch")
    return torch


@pytest.fixture(scope="module")
def trt_bundle(make_bundle, task_specs):
    """onnx_bundle's three tasks (the packs fixture) exported with TensorRT engines too."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (needs an NVIDIA GPU and driver)")
    pytest.importorskip("cuda", reason="cuda-python is not installed")
    _cuda_torch()
    from rmt_deploy.artifacts.bundle import Bundle

    return Bundle.open(make_bundle(task_specs.three, mode="both", target="trt", max_batch=4))


def _folded_logits(bundle, task: str, batch: np.ndarray) -> np.ndarray:
    """Logits from the task's folded TensorRT engine (the reference for a refit engine)."""
    import tensorrt as trt

    from rmt_deploy.runtime.backends.tensorrt import _check, _import_cudart

    cudart = _import_cudart()
    plan = (bundle.root / bundle.manifest.files["tensorrt"]["folded"][task]).read_bytes()
    folded = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
    context = folded.create_execution_context()
    batch = np.ascontiguousarray(batch, dtype=np.float32)
    assert context.set_input_shape("image", batch.shape)
    out = np.empty(tuple(context.get_tensor_shape("logits")), np.float32)
    d_in = _check(cudart, cudart.cudaMalloc(batch.nbytes))
    d_out = _check(cudart, cudart.cudaMalloc(out.nbytes))
    stream = _check(cudart, cudart.cudaStreamCreate())
    try:
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(cudart, cudart.cudaMemcpy(d_in, batch.ctypes.data, batch.nbytes, h2d))
        context.set_tensor_address("image", d_in)
        context.set_tensor_address("logits", d_out)
        assert context.execute_async_v3(int(stream))
        _check(cudart, cudart.cudaStreamSynchronize(stream))
        _check(cudart, cudart.cudaMemcpy(out.ctypes.data, d_out, out.nbytes, d2h))
    finally:
        cudart.cudaFree(d_in), cudart.cudaFree(d_out), cudart.cudaStreamDestroy(stream)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("cache_tasks", [1, 2])
def test_tensorrt_refit_matches_folded_engines_across_switches(trt_bundle, images, cache_tasks):
    """cache_tasks=1: every switch rewrites the one slot; 2: alpha<->beta switch between two cached slots."""
    batch = images[:4]
    expected = {task: _folded_logits(trt_bundle, task, batch) for task in ["alpha", "beta", "gamma"]}
    with Engine.load(trt_bundle, backend="auto", device="cuda", cache_tasks=cache_tasks) as engine:
        assert engine.backend == "tensorrt"
        for step, task in enumerate(["alpha", "beta", "alpha", "beta", "gamma", "alpha"]):
            cached = task in engine.resident_tasks
            engine.switch(task)
            np.testing.assert_allclose(engine.predict(batch).logits, expected[task], rtol=1e-3, atol=1e-3)
            if step in (2, 3):  # the alpha/beta revisits: cached slots with 2 buffers, rewrites with 1
                assert cached == (cache_tasks == 2), (step, task, engine.resident_tasks)
        results = {}  # another host thread: the backend must make its device current there itself
        worker = threading.Thread(target=lambda: results.update(beta=engine.predict(batch, task="beta").logits))
        worker.start()
        worker.join()
        np.testing.assert_allclose(results["beta"], expected["beta"], rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_torch_cuda_backend_matches_masked_model_across_switches(request, packs, images, reference):
    _cuda_torch()
    torch_bundle = request.getfixturevalue("torch_bundle")
    with Engine.load(torch_bundle, backend="torch", device="cuda", cache_tasks=1) as engine:
        assert engine.backend == "torch-cuda"
        for task in ["alpha", "beta", "alpha"]:
            engine.switch(task)
            np.testing.assert_allclose(engine.predict(images).logits, reference(packs[task], images),
                                       rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_onnxruntime_cuda_iobinding_matches_cpu(request, images):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA execution provider (pip install onnxruntime-gpu)")
    onnx_bundle = request.getfixturevalue("onnx_bundle")
    with Engine.load(onnx_bundle, device="cuda", cache_tasks=1) as gpu, Engine.load(onnx_bundle) as cpu:
        assert gpu.backend == "onnxruntime-cuda"
        for task in ["alpha", "beta", "alpha"]:
            np.testing.assert_allclose(gpu.predict(images, task=task).logits, cpu.predict(images, task=task).logits,
                                       rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_auto_on_cuda_runs_torch_on_cuda_when_onnxruntime_has_no_cuda_provider(request, packs, images, reference):
    _cuda_torch()
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA execution provider: auto picks it")
    onnx_bundle = request.getfixturevalue("onnx_bundle")
    with Engine.load(onnx_bundle, device="cuda", cache_tasks=1) as engine:
        assert engine.backend == "torch-cuda"  # onnx_bundle has no TensorRT engine
        np.testing.assert_allclose(engine.predict(images, task="beta").logits, reference(packs["beta"], images),
                                   rtol=1e-3, atol=1e-3)


# ---- TensorRT backend, pure parts (CPU) ----

def _trt_manifest(perm=(1, 0), dtype="float32", weights_shape=None):
    from rmt_deploy.artifacts.bundle import MaskedTensor

    tensors = [MaskedTensor("blocks.0.in_proj_weight", [6, 4], dtype, "w_in"),
               MaskedTensor("blocks.0.fc.weight", [5, 4], dtype, "w_fc")]
    shape = weights_shape or ([4, 6] if perm else [6, 4])
    refit = {"blocks.0.in_proj_weight": {"tensor": "blocks.0.in_proj_weight", "weights": "w_in",
                                         "perm": list(perm) if perm else None, "shape": shape, "dtype": dtype},
             "blocks.0.fc.weight": {"tensor": "blocks.0.fc.weight", "weights": "w_fc", "perm": None,
                                    "shape": [5, 4], "dtype": dtype}}
    return SimpleNamespace(masked_tensors=tensors, tensorrt={"refit": {"weights": refit}})


def test_tensorrt_specs_follow_the_refit_map():
    specs = trt_backend.tensor_specs(_trt_manifest())
    assert [(s.key, s.shape, s.dtype.name, s.tensor, s.perm) for s in specs] == [
        ("w_in", (4, 6), "float32", "blocks.0.in_proj_weight", (1, 0)),
        ("w_fc", (5, 4), "float32", "blocks.0.fc.weight", None),
    ]


def test_tensorrt_specs_refuse_bad_refit_maps():
    with pytest.raises(ArtifactError, match="bfloat16.*refits only float32, float16"):
        trt_backend.tensor_specs(_trt_manifest(dtype="bfloat16"))
    with pytest.raises(ArtifactError, match="has shape \\[6, 4\\]"):
        trt_backend.tensor_specs(_trt_manifest(weights_shape=[6, 4]))
    manifest = _trt_manifest()
    del manifest.tensorrt["refit"]["weights"]["blocks.0.fc.weight"]
    with pytest.raises(ArtifactError, match="refit map lacks 'blocks.0.fc.weight'"):
        trt_backend.tensor_specs(manifest)


def test_tensorrt_pool_holds_transposed_masked_weights(tmp_path):
    """fill_base_all + stored_indices give the engine layout: transpose(base * mask, perm)."""
    from safetensors.numpy import save_file

    from rmt_deploy.runtime.baseweights import SafetensorsReader
    from rmt_deploy.runtime.buffer_pool import TaskPool

    rng = np.random.default_rng(0)
    base = {"blocks.0.in_proj_weight": rng.standard_normal((6, 4)).astype(np.float32),
            "blocks.0.fc.weight": rng.standard_normal((5, 4)).astype(np.float32)}
    save_file(base, str(tmp_path / "w.safetensors"))
    reader = SafetensorsReader(tmp_path / "w.safetensors")
    specs = trt_backend.tensor_specs(_trt_manifest())
    arrays = {s.key: np.empty(s.shape, s.dtype) for s in specs}
    trt_backend.fill_base_all(reader, specs, arrays, None)
    np.testing.assert_array_equal(arrays[specs[0].key], base["blocks.0.in_proj_weight"].T)

    pool = TaskPool(specs, lambda arrays: trt_backend.fill_base_all(reader, specs, arrays, None), capacity=1,
                    workers=1)
    masks = {name: rng.random(value.shape) > 0.3 for name, value in base.items()}
    zeros = {s.key: pool.zero_set(s.key, s.stored_indices(np.flatnonzero(~masks[s.tensor]))) for s in specs}
    with pool.lease("t", lambda: zeros) as lease:
        for spec in specs:
            want = base[spec.tensor] * masks[spec.tensor]
            want = np.transpose(want, spec.perm) if spec.perm else want
            np.testing.assert_array_equal(lease.arrays[spec.key], want)
    pool.close()


def _io(**changes):
    io = {"image": trt_backend.EngineIO("input", "float32", (8, 3, 32, 32)),
          "embedding": trt_backend.EngineIO("output", "float32", (-1, 16))}
    io.update(changes)
    return io


def test_tensorrt_engine_io_is_checked_against_the_manifest():
    check = trt_backend.engine_io_mismatch
    args = ("image", "embedding", 8, (3, 32, 32), 16)
    assert check(_io(), *args) is None
    assert "max_batch 8" in check(_io(image=trt_backend.EngineIO("input", "float32", (4, 3, 32, 32))), *args)
    assert "no input tensor 'image'" in check({"embedding": _io()["embedding"]}, *args)
    assert "no output tensor 'embedding'" in check(
        _io(embedding=trt_backend.EngineIO("input", "float32", (8, 16))), *args)
    assert "is float16" in check(_io(embedding=trt_backend.EngineIO("output", "float16", (-1, 16))), *args)
    assert "12 features" in check(_io(embedding=trt_backend.EngineIO("output", "float32", (-1, 12))), *args)
