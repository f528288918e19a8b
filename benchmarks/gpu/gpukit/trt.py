"""Check 5: TensorRT, if it imports. The library's export with --target trt (the REFIT_INDIVIDUAL shared
engine plus one folded engine per task, each checked against torch by the export), then the engine's
refit switching: A -> B -> A exact, logits against each task's folded engine, latency against the
folded engine, and refit time (uncached: host rewrite + upload + refit; cached: refit from the slot
already on the device). Skipped, saying why, when tensorrt or cuda-python does not import. It has no
CPU part: building an engine needs the GPU.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from gpukit import assets, engine_checks
from gpukit.common import FAIL, PASS, SKIPPED, Context, import_error, result

RTOL = 1e-3  # tests/runtime/test_gpu.py's tolerance: refit engine against the folded engine


class FoldedEngine:
    """A folded task's engine with device buffers allocated once (the fair baseline for latency)."""

    def __init__(self, trt: Any, torch: Any, plan: bytes, max_batch: int, image_shape: tuple[int, ...]):
        self.torch = torch
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
        self.context = self.engine.create_execution_context()
        self.image = torch.empty((max_batch, *image_shape), dtype=torch.float32, device="cuda")

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch, n = self.torch, batch.shape[0]
        image = self.image[:n]
        image.copy_(torch.from_numpy(np.ascontiguousarray(batch)))
        self.context.set_input_shape("image", tuple(image.shape))
        shape = tuple(self.context.get_tensor_shape("logits"))
        out = torch.empty(shape, dtype=torch.float32, device="cuda")
        self.context.set_tensor_address("image", image.data_ptr())
        self.context.set_tensor_address("logits", out.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return out.cpu().numpy()


def run(ctx: Context) -> dict[str, Any]:
    why_trt, why_cuda = import_error("tensorrt"), None
    if why_trt is None:
        from rmt_deploy.errors import MissingDependencyError
        from rmt_deploy.runtime.backends.tensorrt import _import_cudart

        try:
            _import_cudart()
        except MissingDependencyError as exc:
            why_cuda = str(exc)
    if not ctx.cuda:
        state = f"tensorrt: {why_trt or 'imports'}; cuda-python: {why_cuda or ('imports' if not why_trt else '-')}"
        return result(SKIPPED, f"no CPU part (building an engine needs the GPU); {state}")
    if why_trt:
        return result(SKIPPED, f"tensorrt does not import ({why_trt}); its wheels (libnvinfer) are far over the "
                               "64 MiB carry, so this check runs only where TensorRT is installed")
    if why_cuda:
        return result(SKIPPED, f"cuda-python does not load, which the TensorRT backend needs: {why_cuda}")
    import tensorrt as trt
    import torch

    from rmt_deploy.artifacts.bundle import Bundle
    from rmt_deploy.runtime.engine import Engine

    model, max_batch = ctx.trt_model, 32
    root, report = assets.exported_bundle(ctx.work, model, "trt", max_batch)
    bundle = Bundle.open(root)
    a, b = bundle.tasks[:2]
    image_shape = (3, *bundle.manifest.preprocess.image_size)
    batch = assets.input_batch(bundle.manifest.preprocess.image_size, max_batch)
    count, nbytes = assets.masked_nbytes(root)
    folded = {t: FoldedEngine(trt, torch, (root / bundle.manifest.files["tensorrt"]["folded"][t]).read_bytes(),
                              max_batch, image_shape) for t in (a, b)}

    def reference(task: str, x: np.ndarray) -> np.ndarray:
        return folded[task](x)

    def load(cache_tasks: int) -> Engine:
        return Engine.load(root, backend="tensorrt", device="cuda", cache_tasks=cache_tasks)

    compare = engine_checks.versus_folded(reference, a, b, batch, max_batch, ctx.reps, RTOL, "the folded engine", ctx.log)
    figures, failures = engine_checks.switching(load, a, b, batch, ctx.reps, then=compare)
    figures.update(model=model, masked_weights=count, masked_mb=nbytes / 1e6, max_batch=max_batch,
                   version=str(trt.__version__), engines=bundle.manifest.files.get("tensorrt"),
                   builder_flags=bundle.manifest.tensorrt.get("builder_flags"))
    figures.update(assets.export_figures(report))
    big = figures["predict"][f"batch_{max_batch}"]
    text = (f"{model}: refit switch uncached {figures['uncached_switch_ms']:.2f} ms, cached "
            f"{figures['cached_switch_ms']:.2f} ms; predict batch {max_batch} {big['ratio']:.2f}x the folded engine, "
            f"batch 1 {figures['predict']['batch_1']['ratio']:.2f}x")
    if failures:
        return result(FAIL, "; ".join(failures) + f"; {text}", **figures)
    exact = "A->B->A bit-exact" if figures["a_b_a_bit_exact"] else "A->B->A within run-to-run noise"
    return result(PASS, f"{text}; logits match the folded engines, {exact}", **figures)
