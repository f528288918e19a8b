"""Export: a base model plus TaskPacks -> a bundle of shared and/or folded ONNX (and TensorRT) models.

`export_bundle(ExportConfig(...))` is the API; `rmt-deploy export` (rmt_deploy.cli.export) its CLI.
May import: rmt_deploy.basemodel, rmt_deploy.artifacts, rmt_deploy.errors.
Importing this package is cheap: torch and onnx load only when exporting.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rmt_deploy.errors import InputError

if TYPE_CHECKING:
    from rmt_deploy.export.report import ExportReport

TARGETS = ("onnx", "trt")
MODES = ("shared", "folded", "both")
# masked inputs: "required" = plain graph inputs, base values in a separate file;
# "defaults" = graph inputs whose initializers hold the base values (any client can run it unfed)
REQUIRED = "required"
DEFAULTS = "defaults"
MASKED_INPUT_KINDS = (REQUIRED, DEFAULTS)
OPSETS = range(18, 24)

__all__ = ["ExportConfig", "export_bundle", "TARGETS", "MODES", "MASKED_INPUT_KINDS", "OPSETS"]


@dataclass
class ExportConfig:
    """What to export and how.

    target: "onnx", or "trt" (ONNX plus TensorRT engines; needs an NVIDIA GPU).
    mode: "shared" (base.onnx + tasks/), "folded" (folded/<task>.onnx + tasks/) or "both".
    fp16: fp16 weights and activations, LayerNorm and softmax in fp32.
    masked_inputs: "required" (masked weights are plain graph inputs the runtime always feeds;
      base values in base_weights.safetensors: one dense copy in memory) or "defaults"
      (inputs with the base values as initializer defaults: runnable unfed by any ONNX client,
      but ONNX Runtime keeps the defaults resident even when fed).
    force: replace an existing bundle at `out`. verify: check against torch after export.
    """

    model_name: str
    pretrained: str | None
    task_paths: list[Path]
    out: Path
    target: str = "onnx"
    mode: str = "shared"
    fp16: bool = False
    opset: int = 18
    max_batch: int = 32
    force: bool = False
    verify: bool = True
    masked_inputs: str = "required"

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "fp32"

    def validate(self) -> None:
        """InputError naming the bad value and the choices."""
        for label, value, choices in (("target", self.target, TARGETS), ("mode", self.mode, MODES),
                                      ("masked_inputs", self.masked_inputs, MASKED_INPUT_KINDS)):
            if value not in choices:
                raise InputError(f"{label} {value!r} is not one of {', '.join(choices)}")
        if self.opset not in OPSETS:
            raise InputError(f"opset {self.opset} is not supported: choose {OPSETS.start}-{OPSETS.stop - 1}")
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise InputError(f"max_batch {self.max_batch!r} must be a positive integer")
        self.task_paths = [Path(p) for p in self.task_paths]
        self.out = Path(self.out)


def export_bundle(config: ExportConfig, progress: bool = True) -> "ExportReport":
    """Write a verified bundle to config.out atomically and return its sizes and errors."""
    from rmt_deploy.export.pipeline import export_bundle as run

    return run(config, progress=progress)
