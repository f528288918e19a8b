"""GPU backends: TensorRT (refit switching, checked against folded engines) and torch on CUDA.

These skip with the reason when TensorRT, cuda-python or a CUDA device is missing.
"""
from __future__ import annotations

import numpy as np
import pytest

from rmt_deploy.runtime.engine import Engine


def _cuda_torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible to torch")
    return torch


@pytest.fixture(scope="module")
def trt_bundle(tmp_path_factory, tiny_checkpoint, packs):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (needs an NVIDIA GPU and driver)")
    pytest.importorskip("cuda", reason="cuda-python is not installed")
    _cuda_torch()
    from rmt_deploy.bundle import Bundle
    from rmt_deploy.export import ExportConfig, export_bundle

    root = tmp_path_factory.mktemp("trt_packs")
    paths = [pack.save(root / f"{name}.rmtask") for name, pack in packs.items()]
    out = tmp_path_factory.mktemp("trt") / "bundle"
    export_bundle(ExportConfig("rmt-tiny-vit", str(tiny_checkpoint), paths, out, target="trt", mode="both",
                               max_batch=4), progress=False)
    return Bundle.open(out)


@pytest.mark.gpu
def test_tensorrt_refit_matches_folded_engines_across_switches(trt_bundle, images):
    import tensorrt as trt

    from rmt_deploy.runtime.backends.tensorrt import _check, _import_cudart

    cudart = _import_cudart()
    with Engine.load(trt_bundle, backend="auto", device="cuda", cache_tasks=1) as engine:
        assert engine.backend == "tensorrt"
        logger = trt.Logger(trt.Logger.WARNING)
        for task in ["alpha", "beta", "alpha", "gamma"]:
            engine.switch(task)
            got = engine.predict(images[:4]).logits
            plan = (trt_bundle.root / trt_bundle.manifest.files["tensorrt"]["folded"][task]).read_bytes()
            folded = trt.Runtime(logger).deserialize_cuda_engine(plan)
            context = folded.create_execution_context()
            batch = np.ascontiguousarray(images[:4])
            out = np.empty_like(got)
            d_in = _check(cudart, cudart.cudaMalloc(batch.nbytes))
            d_out = _check(cudart, cudart.cudaMalloc(out.nbytes))
            h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            _check(cudart, cudart.cudaMemcpy(d_in, batch.ctypes.data, batch.nbytes, h2d))
            context.set_input_shape("image", batch.shape)
            context.set_tensor_address("image", d_in)
            context.set_tensor_address("logits", d_out)
            stream = _check(cudart, cudart.cudaStreamCreate())
            assert context.execute_async_v3(int(stream))
            _check(cudart, cudart.cudaStreamSynchronize(stream))
            _check(cudart, cudart.cudaMemcpy(out.ctypes.data, d_out, out.nbytes, d2h))
            cudart.cudaFree(d_in), cudart.cudaFree(d_out), cudart.cudaStreamDestroy(stream)
            np.testing.assert_allclose(got, out, rtol=1e-3, atol=1e-3)


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
