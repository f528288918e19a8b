"""TensorRT engines for a bundle being exported: which to build, their files, manifest entry and checks.

Needs tensorrt and a CUDA device (see tensorrt.require_tensorrt); never runs in CPU-only tests.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from rmt_deploy.artifacts.bundle import FOLDED_DIR, Preprocess
from rmt_deploy.artifacts.task_file import TaskPack
from rmt_deploy.artifacts.tensorrt_files import engine_file_name
from rmt_deploy.errors import InternalError
from rmt_deploy.export import onnx as graphs
from rmt_deploy.export import tensorrt as rt
from rmt_deploy.export import verify

_SCRATCH = ".tensorrt-base.onnx"


def build_bundle_engines(trt: Any, stage: Path, shared_model: Any, files: Mapping[str, Any],
                         packs: list[TaskPack], base_values: Mapping[str, np.ndarray],
                         names: Mapping[str, str], preprocess: Preprocess, config: Any,
                         visual: Any | None) -> tuple[dict[str, Any], dict[str, Any], list[verify.Check]]:
    """Build the shared refittable engine and/or one engine per folded task; check them if `visual`.

    Returns (files entry for the manifest, `tensorrt` manifest entry, checks).
    """
    gpu = rt.current_gpu()
    version = str(trt.__version__)
    image_shape = [3, *preprocess.image_size]
    tolerance = verify.FP16_TOLERANCE if config.fp16 else rt.TENSORRT_FP32_TOLERANCE
    images = verify.random_images(preprocess.image_size)
    references = _references(visual, packs, base_values, images) if visual is not None else {}
    out: dict[str, Any] = {}
    checks: list[verify.Check] = []
    refit = None
    plan = None
    if "base" in files:
        refit = rt.refit_map(shared_model, names)
        plan = rt.plan_build(version, shared=True, precision=config.precision, max_batch=config.max_batch,
                             image_shape=image_shape, refittable=tuple(e.weights for e in refit.values()))
        engine = _build_shared(trt, stage, stage / files["base"], refit, base_values, plan)
        out["base"] = engine_file_name("base", gpu["name"])
        (stage / out["base"]).write_bytes(engine)
        checks += _check_shared(trt, engine, refit, packs, base_values, images, references, tolerance)
    if files.get("folded"):
        folded_plan = rt.plan_build(version, shared=False, precision=config.precision,
                                    max_batch=config.max_batch, image_shape=image_shape)
        plan = plan or folded_plan
        out["folded"] = {}
        for pack in packs:
            engine = rt.build_engine(trt, stage / files["folded"][pack.name], folded_plan)
            relative = engine_file_name(f"{FOLDED_DIR}/{pack.name}", gpu["name"])
            (stage / relative).write_bytes(engine)
            out["folded"][pack.name] = relative
            if pack.name in references:
                test = rt.EngineRunner(trt, engine).run({graphs.IMAGE_INPUT: images}, graphs.LOGITS_OUTPUT)
                checks.append(verify.compare(pack.name, "tensorrt-folded", references[pack.name], test, tolerance))
    if plan is None:
        raise InternalError("no ONNX graph to build TensorRT engines from")
    entry = rt.tensorrt_manifest(version, gpu, config.precision, plan, refit, out)
    return out, entry, checks


def _build_shared(trt: Any, stage: Path, base_onnx: Path, refit: Mapping[str, rt.RefitEntry],
                  base_values: Mapping[str, np.ndarray], plan: rt.BuildPlan) -> bytes:
    """The masked inputs become named initializers (the refittable weights), then build."""
    import onnx_ir as ir

    model = rt.refittable_model(ir.load(base_onnx), refit, base_values)
    scratch = stage / _SCRATCH
    written = graphs.save_model(model, scratch)
    try:
        return rt.build_engine(trt, scratch, plan)
    finally:
        for path in written:
            path.unlink(missing_ok=True)


def task_weights(refit: Mapping[str, rt.RefitEntry], base_values: Mapping[str, np.ndarray],
                 pack: TaskPack) -> dict[str, np.ndarray]:
    """TensorRT weights name -> the task's masked weight in the engine's layout and dtype."""
    weights = {}
    for tensor, entry in refit.items():
        masked = base_values[tensor] * pack.masks[tensor]
        if entry.perm is not None:
            masked = np.transpose(masked, entry.perm)
        weights[entry.weights] = np.ascontiguousarray(masked, dtype=np.dtype(entry.dtype))
    return weights


def _check_shared(trt: Any, engine: bytes, refit: Mapping[str, rt.RefitEntry], packs: list[TaskPack],
                  base_values: Mapping[str, np.ndarray], images: np.ndarray,
                  references: Mapping[str, np.ndarray], tolerance: float) -> list[verify.Check]:
    """Every mapped weight must be refittable; each task refitted in turn must match torch."""
    runner = rt.EngineRunner(trt, engine)
    missing = {e.weights for e in refit.values()} - set(runner.refittable())
    if missing:
        raise InternalError(f"TensorRT engine lacks refittable weights {sorted(missing)}")
    checks = []
    for pack in packs:
        if pack.name not in references:
            continue
        runner.refit(task_weights(refit, base_values, pack))
        embedding = runner.run({graphs.IMAGE_INPUT: images}, graphs.EMBEDDING_OUTPUT)
        test = verify.logits(embedding, pack)
        checks.append(verify.compare(pack.name, "tensorrt-shared", references[pack.name], test, tolerance))
    return checks


def _references(visual: Any, packs: list[TaskPack], base_values: Mapping[str, np.ndarray],
                images: np.ndarray) -> dict[str, np.ndarray]:
    references = {}
    for pack in packs:
        masked = {n: np.asarray(w, dtype=np.float32) * pack.masks[n] for n, w in base_values.items()}
        embedding = verify.torch_embeddings(visual, masked, images)
        references[pack.name] = verify.logits(embedding, pack)
    return references
