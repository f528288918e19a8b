"""Numeric precision of training and evaluation: fp32 (the reference) or bf16 / fp16 autocast.

Autocast covers the image tower only. The class-head product, the logits, the
losses and the gradient-dropout formula run in fp32 under any precision: bf16
logits near 30 step by 0.125, enough to tie fine-grained classes and to coarsen
g_kl. fp16 also scales the losses (dynamic loss scaling) so that small score
gradients do not underflow; a step whose gradients overflow is skipped.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

from rmt_deploy.errors import InputError

PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_PRECISION = "fp32"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device) -> str:
    """The precision if this device can run it, else InputError naming the value and the fix."""
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError(f"--precision bf16 but {torch.cuda.get_device_name(device)} has no bfloat16 support: "
                         "use --precision fp32 or fp16")
    return precision


def autocast(device: torch.device, precision: str):
    """torch.autocast in the precision's dtype on this device; nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def class_logits(features: torch.Tensor, head: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """logit_scale * normalize(features) @ head^T in fp32, whatever autocast is active."""
    with torch.autocast(features.device.type, enabled=False):
        return logit_scale * F.normalize(features.float(), dim=-1) @ head.float().t()


class LossScaler:
    """Dynamic loss scaling for fp16 (a no-op otherwise): scale up after `interval` good steps, halve on overflow."""

    def __init__(self, enabled: bool, scale: float = 2.0 ** 16, interval: int = 2000) -> None:
        self.enabled, self.scale, self.interval, self.good_steps = enabled, scale if enabled else 1.0, interval, 0

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    def unscale(self, *grads: torch.Tensor) -> bool:
        """Divide the gradients in place by the scale; False (skip the step) if any is not finite."""
        if not self.enabled:
            return True
        finite = True
        for grad in grads:
            grad.div_(self.scale)
            finite = finite and bool(torch.isfinite(grad).all())
        self._update(finite)
        return finite

    def _update(self, finite: bool) -> None:
        if not finite:
            self.scale, self.good_steps = max(self.scale / 2, 1.0), 0
            return
        self.good_steps += 1
        if self.good_steps >= self.interval:
            self.scale, self.good_steps = self.scale * 2, 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
