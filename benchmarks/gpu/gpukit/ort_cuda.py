"""Check 4: ONNX Runtime on CUDA with IOBinding, if onnxruntime-gpu is installed: the library's export
(shared + folded, verified against torch), then the engine's uncached / cached switch, logits against
the task's folded model in its own CUDA session, and predict latency against that folded session.
Skipped, saying so, when this onnxruntime has no CUDA execution provider. On a CPU (the dry run) the
same code runs on the CPU provider with the tiny model.
"""
from __future__ import annotations

from typing import Any

from gpukit import assets, engine_checks
from gpukit.common import FAIL, PASS, SKIPPED, Context, import_error, result, size_text

CUDA_EP = "CUDAExecutionProvider"
RTOL = 1e-3  # tests/runtime/test_gpu.py's tolerance for ORT CUDA against ORT CPU


def run(ctx: Context) -> dict[str, Any]:
    why = import_error("onnxruntime")
    if why:
        return result(SKIPPED, f"onnxruntime does not import ({why})")
    import onnxruntime as ort

    providers = list(ort.get_available_providers())
    if ctx.cuda and CUDA_EP not in providers:
        return result(SKIPPED, f"onnxruntime {ort.__version__} has no {CUDA_EP} (has {', '.join(providers)}): "
                               "onnxruntime-gpu is not installed, and its wheel is far over the 64 MiB carry",
                      providers=providers, version=ort.__version__)
    from rmt_deploy.artifacts.bundle import Bundle
    from rmt_deploy.runtime.engine import Engine

    max_batch = 32 if ctx.cuda else 4
    root, report = assets.exported_bundle(ctx.work, ctx.model, "onnx", max_batch)
    bundle = Bundle.open(root)
    a, b = bundle.tasks[:2]
    batch = assets.input_batch(bundle.manifest.preprocess.image_size, max_batch)
    count, nbytes = assets.masked_nbytes(root)
    session_providers = [(CUDA_EP, {"device_id": 0}), "CPUExecutionProvider"] if ctx.cuda else ["CPUExecutionProvider"]
    folded = {t: ort.InferenceSession(str(bundle.folded_path(t)), providers=session_providers) for t in (a, b)}

    def reference(task: str, x: Any) -> Any:
        return folded[task].run(["logits"], {"image": x})[0]

    def load(cache_tasks: int) -> Engine:
        return Engine.load(root, backend="onnxruntime", device=ctx.device, cache_tasks=cache_tasks)

    compare = engine_checks.versus_folded(reference, a, b, batch, max_batch, ctx.reps, RTOL, "the folded model", ctx.log)
    figures, failures = engine_checks.switching(load, a, b, batch, ctx.reps, then=compare)
    figures.update(model=ctx.model, masked_weights=count, masked_mb=nbytes / 1e6, max_batch=max_batch,
                   version=ort.__version__, providers=providers,
                   folded_session_providers=folded[a].get_providers(), **assets.export_figures(report))
    expected = "onnxruntime-cuda" if ctx.cuda else "onnxruntime-cpu"
    if figures["backend"] != expected:
        failures.append(f"the engine runs {figures['backend']}, not {expected}")
    big = figures["predict"][f"batch_{max_batch}"]
    text = (f"{figures['backend']}: uncached switch {figures['uncached_switch_ms']:.2f} ms, cached "
            f"{figures['cached_switch_ms']:.3f} ms for {size_text(nbytes)}; predict batch {max_batch} "
            f"{big['ratio']:.2f}x the folded session, batch 1 {figures['predict']['batch_1']['ratio']:.2f}x")
    if failures:
        return result(FAIL, "; ".join(failures) + f"; {text}", **figures)
    return result(PASS, f"{text}; logits match the folded models", **figures)
