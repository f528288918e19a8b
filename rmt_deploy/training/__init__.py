"""Regularized Mask Tuning training: masks, gradient dropout, data, heads and the trainer.

May import: rmt_deploy.runtime.preprocess (so trained and served images go through one image
path), rmt_deploy.basemodel, rmt_deploy.artifacts, rmt_deploy.errors.
Names are imported lazily so that listing CLI commands never imports torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TrainConfig": "rmt_deploy.training.trainer",
    "TrainResult": "rmt_deploy.training.trainer",
    "train_task": "rmt_deploy.training.trainer",
    "evaluate_taskpack": "rmt_deploy.training.evaluation",
    "MaskedCLIP": "rmt_deploy.training.masking",
    "apply_masks_": "rmt_deploy.training.masking",
    "remove_masks_": "rmt_deploy.training.masking",
    "fold_masks_": "rmt_deploy.training.masking",
    "gradient_dropout": "rmt_deploy.training.regularizer",
    "build_dataset": "rmt_deploy.training.data",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rmt_deploy.training' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
