"""Export verification: onnx.checker, and ONNX Runtime against the masked torch model per task."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from rmt_deploy.artifacts import heads
from rmt_deploy.errors import ArtifactError, require
from rmt_deploy.export.fp16 import agreement

FP32_TOLERANCE = 1e-5   # relative L2, ONNX Runtime fp32 vs torch fp32
FP16_TOLERANCE = 2e-2   # relative L2, fp16 export vs torch fp32
VERIFY_BATCH = 4
VERIFY_SEED = 0


@dataclass
class Check:
    """One comparison: what was compared, its relative L2 error and top-1 agreement."""

    task: str
    kind: str  # "shared" | "folded" | "tensorrt-shared" | "tensorrt-folded"
    rel_l2: float
    top1: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.rel_l2)) and self.rel_l2 <= self.tolerance

    def line(self) -> str:
        mark = "ok" if self.ok else "FAIL"
        return (f"{self.task:<16} {self.kind:<16} rel L2 {self.rel_l2:.2e} (<= {self.tolerance:.0e}) "
                f"top-1 {self.top1:.0%}  {mark}")


def check_onnx(path: Path) -> None:
    """onnx.checker full check, on the path so external data is found; ArtifactError on failure."""
    onnx = require("onnx", "train")
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # checker raises ValidationError, InferenceError, ...
        raise ArtifactError(f"{path}: onnx.checker rejects the export: {str(exc).splitlines()[0]}") from None


def random_images(image_size: list[int], batch: int = VERIFY_BATCH, seed: int = VERIFY_SEED) -> np.ndarray:
    """Preprocessed-looking float32 NCHW inputs (roughly unit normal, as after CLIP normalisation)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, 3, *image_size)).astype(np.float32)


def session(path: Path, supplied: Mapping[str, np.ndarray] | None = None) -> Any:
    """An ONNX Runtime CPU session at ORT_ENABLE_ALL, the optimisation level users get by default;
    `supplied`: the external initializers of a constant graph (graph input name -> array)."""
    ort = require("onnxruntime", "onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in (supplied or {}).values()]
    if values:
        options.add_external_initializers(list(supplied), values)
    made = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    made.supplied_values = values  # the session reads these buffers: they live as long as it does
    return made


def torch_embeddings(visual: Any, masked: Mapping[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    """The masked torch model's L2-normalised embeddings; `masked` maps open_clip name -> W*M (fp32)."""
    torch = require("torch", "train")
    from torch.func import functional_call

    params = {name[len("visual."):]: torch.from_numpy(np.ascontiguousarray(w)) for name, w in masked.items()}
    with torch.no_grad():
        features = functional_call(visual, params, (torch.from_numpy(images),), strict=False)
        return torch.nn.functional.normalize(features.float(), dim=-1).numpy()


def logits(embeddings: np.ndarray, pack: Any) -> np.ndarray:
    """The runtime's head of a TaskPack's kind (rmt_deploy.artifacts.heads) over embeddings."""
    return heads.logits(embeddings, pack.head, pack.logit_scale, pack.cache)


def compare(task: str, kind: str, reference: np.ndarray, test: np.ndarray, tolerance: float) -> Check:
    rel, top1 = agreement(reference, test)
    return Check(task, kind, rel, top1, tolerance)


def raise_failures(checks: list[Check]) -> None:
    """ArtifactError listing every check above its tolerance."""
    failed = [c for c in checks if not c.ok]
    if failed:
        details = "; ".join(f"{c.task} {c.kind} rel L2 {c.rel_l2:.2e} > {c.tolerance:.0e}" for c in failed)
        raise ArtifactError(f"export does not match the torch model: {details}")
