"""The authors' per-dataset settings, in one place: learning rate, epochs and gradient-dropout lambda.

Source: Zheng et al., ICCV 2023, and the authors' public reference
implementation and README (docs/method.md): Adam lr 8e-5 for 30 epochs, but
ImageNet 3e-5 for 10; gradient-dropout lambda 0.3 at 16 shots for every
dataset except ImageNet, SUN397 and Food101, which keep 1.0 (as do all
datasets at fewer shots). Datasets outside the paper's 11 (an image folder)
get the defaults. `rmt-deploy train` uses these wherever the user gives no
value, and so does benchmarks/paper.
"""
from __future__ import annotations

from dataclasses import dataclass

from rmt_deploy.training.datasets import COOP_DATASETS

DEFAULT_LR = 8e-5
DEFAULT_EPOCHS = 30
DEFAULT_GDR_LAMBDA = 1.0
SCHEDULES = {"imagenet": (3e-5, 10)}  # dataset -> (lr, epochs) where it differs from the default
LEAKY_LAMBDA = 0.3
LEAKY_LAMBDA_SHOTS = 16
FULL_LAMBDA_DATASETS = frozenset({"imagenet", "sun397", "food101"})  # keep lambda 1.0 at 16 shots too


@dataclass(frozen=True)
class Recipe:
    """The settings one (dataset, shots) cell trains with."""

    lr: float
    epochs: int
    gdr_lambda: float


def recipe_for(dataset: str, shots: int) -> Recipe:
    """The authors' lr, epochs and lambda for a dataset key (see rmt_deploy.training.data) at `shots`."""
    lr, epochs = SCHEDULES.get(dataset, (DEFAULT_LR, DEFAULT_EPOCHS))
    leaky = shots == LEAKY_LAMBDA_SHOTS and dataset in COOP_DATASETS and dataset not in FULL_LAMBDA_DATASETS
    return Recipe(lr, epochs, LEAKY_LAMBDA if leaky else DEFAULT_GDR_LAMBDA)
