"""Binary masks over frozen weights: straight-through scores for training, in-place masks for inference.

Training (docs/method.md): every masked weight W gets a float32 score tensor S
(init 1e-2); the forward uses W * 1[S > 5e-3] and the binariser's backward is
the identity (straight-through). `MaskedCLIP` substitutes the masked weights
per call with `torch.func.functional_call`, so the frozen weights are stored
once and the teacher pass is the same model with the masks off.

Inference (torchao-style verbs that change a model in place):
`apply_masks_(model, masks)` zeroes the dropped weights and keeps their base
values sparsely so `remove_masks_(model)` restores the base exactly (a task
switch touches only the dropped entries); `fold_masks_(model, masks)` makes
the masks permanent.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from rmt_deploy.errors import InputError
from rmt_deploy.training.precision import class_logits

SCORE_INIT = 1e-2
THRESHOLD = 5e-3
_APPLIED = "_rmt_applied_masks"


class _Binarize(torch.autograd.Function):
    """M = 1[S > threshold] forward; identity backward (straight-through)."""

    @staticmethod
    def forward(ctx, score: torch.Tensor, threshold: float) -> torch.Tensor:
        return (score > threshold).to(score.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _MaskedWeight(torch.autograd.Function):
    """W * 1[S > threshold], with dL/dS = dL/dM = grad * W; W itself gets no gradient."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, score: torch.Tensor, threshold: float) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return weight * (score > threshold).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return None, (grad * weight).to(torch.float32), None


def binarize(score: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
    """The binary mask 1[S > threshold] as S's dtype, with a straight-through gradient."""
    return _Binarize.apply(score, threshold)


def masked_weight(weight: torch.Tensor, score: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
    """W * binarize(S) in one op (no stored mask); gradient flows to S only."""
    return _MaskedWeight.apply(weight, score, threshold)


class MaskedCLIP(nn.Module):
    """An open_clip model's image tower plus a fixed class head, with trainable mask scores.

    The scores of all masked tensors live in one flat float32 parameter
    (`flat_scores`), so all-reduce, gradient dropout and Adam each run once per
    step over one tensor; `scores[name]` are views of it (take gradients per
    view with `flat_grad`).
    """

    def __init__(
        self,
        model: nn.Module,
        tensor_names: Iterable[str],
        head: torch.Tensor,
        logit_scale: float,
        threshold: float = THRESHOLD,
        init: float = SCORE_INIT,
    ) -> None:
        super().__init__()
        self.visual = model.visual
        for param in self.visual.parameters():
            param.requires_grad_(False)
        params = dict(self.visual.named_parameters())
        self.names = [n for n in tensor_names]
        self._local = {}
        for name in self.names:
            local = name[len("visual."):] if name.startswith("visual.") else name
            if local not in params:
                raise InputError(f"tensor {name!r} is not a visual parameter of this model")
            self._local[name] = local
        self.shapes = {n: tuple(params[self._local[n]].shape) for n in self.names}
        total = sum(int(np.prod(s)) for s in self.shapes.values())
        device = next(self.visual.parameters()).device
        self.flat_scores = nn.Parameter(torch.full((total,), float(init), device=device))
        self.register_buffer("head", head.detach().to(device=device, dtype=torch.float32))
        self.logit_scale = float(logit_scale)
        self.threshold = float(threshold)

    @property
    def scores(self) -> dict[str, torch.Tensor]:
        """Per-tensor views of the flat score parameter, in model order."""
        views, offset = {}, 0
        for name in self.names:
            size = int(np.prod(self.shapes[name]))
            views[name] = self.flat_scores[offset:offset + size].view(self.shapes[name])
            offset += size
        return views

    def masked_weights(self, scores: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """W * M for every masked tensor, keyed by the image tower's own parameter names."""
        params = dict(self.visual.named_parameters())
        scores = self.scores if scores is None else scores
        return {
            self._local[n]: masked_weight(params[self._local[n]], s, self.threshold)
            for n, s in scores.items()
        }

    def image_features(self, images: torch.Tensor, masked: bool = True,
                       scores: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Image embeddings (unnormalised, in autocast's dtype), with the masks on (student) or off (teacher)."""
        if masked:
            return torch.func.functional_call(self.visual, self.masked_weights(scores), (images,))
        return self.visual(images)

    def forward(self, images: torch.Tensor, masked: bool = True,
                scores: Mapping[str, torch.Tensor] | None = None, head: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits: logit_scale * normalize(f_img) @ head^T, in fp32 under any autocast.

        `scores` (views from `self.scores`) lets a caller take gradients with
        respect to the views themselves: much cheaper than accumulating many
        slices into the flat parameter. `head` replaces the stored head (CoOp's learned prompts).
        """
        head = self.head if head is None else head
        return class_logits(self.image_features(images, masked, scores), head, self.logit_scale)

    def flat_grad(self, loss: torch.Tensor, scores: Mapping[str, torch.Tensor],
                  retain_graph: bool = False) -> torch.Tensor:
        """d loss / d flat_scores, through the score views the forward used."""
        grads = torch.autograd.grad(loss, list(scores.values()), retain_graph=retain_graph, allow_unused=True)
        return torch.cat([
            (g if g is not None else torch.zeros_like(s)).reshape(-1) for g, s in zip(grads, scores.values())
        ])

    @torch.no_grad()
    def binary_masks(self) -> dict[str, torch.Tensor]:
        """The current masks as bool tensors (True = weight kept), by full tensor name."""
        return {n: (s > self.threshold) for n, s in self.scores.items()}

    @torch.no_grad()
    def sparsity(self) -> float:
        """Fraction of masked entries that are currently zero."""
        return float((self.flat_scores <= self.threshold).float().mean())

    @torch.no_grad()
    def load_scores(self, scores: Mapping[str, torch.Tensor]) -> None:
        """Copy saved score tensors (by name) into the flat parameter."""
        views = self.scores
        if set(scores) != set(views):
            raise InputError(
                f"saved scores cover tensors {sorted(scores)[:3]}..., this run masks {sorted(views)[:3]}...: "
                "resume with the same --mask-groups and model"
            )
        for name, view in views.items():
            view.copy_(scores[name].to(view.device, view.dtype).view(view.shape))


def _as_bool_tensor(mask: Any, like: torch.Tensor, name: str) -> torch.Tensor:
    if isinstance(mask, np.ndarray):
        if mask.dtype != np.bool_:
            raise InputError(f"mask for {name!r} has dtype {mask.dtype}: masks must be bool (True = kept)")
        mask = torch.from_numpy(mask)
    elif not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise InputError(f"mask for {name!r} must be a bool numpy array or bool torch tensor")
    if tuple(mask.shape) != tuple(like.shape):
        raise InputError(
            f"mask for {name!r} has shape {tuple(mask.shape)}, the weight has {tuple(like.shape)}: "
            "the task was trained on a different model"
        )
    return mask.to(like.device)


def _resolve(model: nn.Module, masks: Mapping[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    params = dict(model.named_parameters())
    missing = [n for n in masks if n not in params]
    if missing:
        raise InputError(
            f"masked tensor {missing[0]!r} is not a parameter of this model "
            f"({len(missing)} unknown): load the base model the task was trained on"
        )
    return {n: (params[n], _as_bool_tensor(m, params[n], n)) for n, m in masks.items()}


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: Mapping[str, Any]) -> nn.Module:
    """Zero the dropped weights of `model` in place (w = base * mask), reversibly.

    masks: tensor name -> bool array/tensor (True = kept), e.g. `TaskPack.masks`.
    Masks already applied are removed first, so this is also a task switch; the
    dropped base values are kept sparsely for `remove_masks_`. Returns the model.
    """
    resolved = _resolve(model, masks)
    remove_masks_(model)
    saved = {}
    for name, (param, keep) in resolved.items():
        flat = param.data.view(-1)
        index = torch.nonzero(~keep.view(-1)).view(-1)
        saved[name] = (index, flat[index].clone())
        flat[index] = 0
    model.__dict__[_APPLIED] = saved
    return model


@torch.no_grad()
def remove_masks_(model: nn.Module) -> nn.Module:
    """Restore the base values zeroed by `apply_masks_` (no-op if none are applied)."""
    saved = model.__dict__.pop(_APPLIED, None) or {}
    params = dict(model.named_parameters())
    for name, (index, values) in saved.items():
        params[name].data.view(-1)[index] = values
    return model


@torch.no_grad()
def fold_masks_(model: nn.Module, masks: Mapping[str, Any] | None = None) -> nn.Module:
    """Make masks permanent in place: w = base * mask, with no way back (for export).

    With `masks`, applies them first; without, folds the masks `apply_masks_`
    applied. Either way the sparse copy of dropped base values is released.
    """
    if masks is not None:
        apply_masks_(model, masks)
    elif _APPLIED not in model.__dict__:
        raise InputError("no masks to fold: pass masks or call apply_masks_ first")
    model.__dict__.pop(_APPLIED, None)
    return model


def applied_masks(model: nn.Module) -> list[str]:
    """Names of the tensors whose masks `apply_masks_` currently holds on this model."""
    return sorted(model.__dict__.get(_APPLIED, {}))
