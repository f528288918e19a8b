"""TrainConfig: everything that defines a training run, its checks, and the authors' per-dataset defaults."""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from rmt_deploy.artifacts.heads import ZEROSHOT, check_kind
from rmt_deploy.artifacts.task_file import check_task_name
from rmt_deploy.basemodel.loading import MASK_GROUPS
from rmt_deploy.errors import InputError
from rmt_deploy.training.cache import AUGMENT_VIEWS
from rmt_deploy.training.data import SUBSAMPLES, resolve_dataset
from rmt_deploy.training.datasets import check_template
from rmt_deploy.training.masking import SCORE_INIT, THRESHOLD
from rmt_deploy.training.precision import DEFAULT_PRECISION, PRECISIONS
from rmt_deploy.training.prompts import LR as COOP_LR
from rmt_deploy.training.prompts import N_CTX
from rmt_deploy.training.recipe import recipe_for
from rmt_deploy.training.regularizer import SCORE_L2_WEIGHT

MAX_LR = 10.0  # Adam and SGD rates above this are a typo (the paper's is 8e-5)
CONFIG_VERSION = 2  # 2: `precision` replaced `amp`; lr, epochs and gdr_lambda default to the recipe
# fields added since version 2 with defaults that reproduce what runs before them did (resume compares them)
ADDED_DEFAULTS = {"head": ZEROSHOT, "coop_n_ctx": N_CTX, "coop_ctx_init": "", "coop_lr": COOP_LR,
                  "tip_views": AUGMENT_VIEWS}


@dataclass
class TrainConfig:
    """Everything that defines a training run; round-trips through JSON (`to_dict`/`from_dict`).

    lr, epochs and gdr_lambda left as None take the authors' value for the
    dataset and shot count (rmt_deploy.training.recipe); `resolved()` fills them.
    """

    model: str
    dataset: str
    data_root: str
    out: str
    pretrained: str | None = None
    task: str | None = None  # default: the dataset (or image folder) name
    template: str | None = None  # prompt template with '{}'; default: the dataset's
    shots: int = 16  # per class; 0 trains on the full train split
    seed: int = 1
    epochs: int | None = None  # None: 30 (ImageNet 10)
    batch_size: int = 32  # global: split evenly across torchrun ranks
    lr: float | None = None  # None: 8e-5 (ImageNet 3e-5)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    score_l2: float = SCORE_L2_WEIGHT
    score_init: float = SCORE_INIT
    threshold: float = THRESHOLD
    gdr: bool = True
    gdr_lambda: float | None = None  # None: 0.3 at 16 shots (not ImageNet, SUN397, Food101), else 1.0
    temperature: float = 1.0
    mask_groups: tuple[str, ...] = ("attn",)
    subsample: str = "all"  # base-to-new: train on the "base" half of the classes
    device: str = "auto"
    precision: str = DEFAULT_PRECISION  # fp32 (reference), or bf16 / fp16 autocast on the image tower
    workers: int = 4
    eval_batch_size: int = 64
    keep_checkpoints: int = 1
    resume: bool = False
    progress: bool = True
    head: str = ZEROSHOT  # zeroshot | coop | tip-adapter | tip-adapter-f (rmt_deploy.artifacts.heads)
    coop_n_ctx: int = N_CTX  # CoOp context tokens (ignored with coop_ctx_init: its word count)
    coop_ctx_init: str = ""  # e.g. "a photo of a"; "" draws the context from N(0, 0.02)
    coop_lr: float = COOP_LR  # CoOp's SGD rate: warm-up epoch at 1e-5, then cosine
    tip_views: int = AUGMENT_VIEWS  # augmented views averaged into each cache key
    version: int = field(default=CONFIG_VERSION)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every field."""
        data = dataclasses.asdict(self)
        data["mask_groups"] = list(self.mask_groups)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Build from `to_dict` output; unknown keys are dropped with a warning."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            warnings.warn(f"ignoring unknown TrainConfig keys: {', '.join(unknown)}", stacklevel=2)
        kwargs = {k: v for k, v in data.items() if k in names}
        if "mask_groups" in kwargs:
            kwargs["mask_groups"] = tuple(kwargs["mask_groups"])
        return cls(**kwargs)

    def resolved(self) -> "TrainConfig":
        """A copy with lr, epochs and gdr_lambda filled from the recipe where they are None."""
        recipe = recipe_for(resolve_dataset(self.dataset), self.shots)
        return dataclasses.replace(
            self, lr=recipe.lr if self.lr is None else self.lr,
            epochs=recipe.epochs if self.epochs is None else self.epochs,
            gdr_lambda=recipe.gdr_lambda if self.gdr_lambda is None else self.gdr_lambda)

    def validate(self) -> "TrainConfig":
        """Explicit checks with the bad value and the fix; returns the resolved config."""
        self._check_finite()
        cfg = self.resolved()
        checks = [
            (cfg.shots >= 0, f"--shots {cfg.shots}: images per class must be 0 (all) or more"),
            (cfg.seed >= 0, f"--seed {cfg.seed}: must be 0 or more"),
            (cfg.epochs >= 1, f"--epochs {cfg.epochs}: train for at least 1 epoch"),
            (cfg.batch_size >= 1, f"--batch-size {cfg.batch_size}: must be at least 1"),
            (cfg.eval_batch_size >= 1, f"--eval-batch-size {cfg.eval_batch_size}: must be at least 1"),
            (cfg.keep_checkpoints >= 0, f"--keep-checkpoints {cfg.keep_checkpoints}: must be 0 (all) or more"),
            (0 < cfg.lr <= MAX_LR, f"--lr {cfg.lr}: the learning rate must lie in (0, {MAX_LR:g}]"),
            (0 <= cfg.adam_beta1 < 1 and 0 <= cfg.adam_beta2 < 1,
             f"--adam-beta1 {cfg.adam_beta1} / --adam-beta2 {cfg.adam_beta2}: Adam's betas lie in [0, 1)"),
            (cfg.weight_decay >= 0, f"--weight-decay {cfg.weight_decay}: must be 0 or more"),
            (cfg.score_l2 >= 0, f"--score-l2 {cfg.score_l2}: must be 0 or more"),
            (0.0 <= cfg.gdr_lambda <= 1.0, f"--gdr-lambda {cfg.gdr_lambda}: must lie in [0, 1]"),
            (cfg.temperature > 0, f"temperature {cfg.temperature}: must be positive"),
            (cfg.workers >= 0, f"--workers {cfg.workers}: must be 0 or more"),
            (cfg.score_init > cfg.threshold, f"score init {cfg.score_init} must exceed the threshold "
                                             f"{cfg.threshold} so every mask starts at 1"),
            (cfg.precision in PRECISIONS, f"--precision {cfg.precision!r} is not one of {', '.join(PRECISIONS)}"),
            (cfg.subsample in SUBSAMPLES, f"--subsample {cfg.subsample!r} is not one of {', '.join(SUBSAMPLES)}"),
            (cfg.coop_n_ctx >= 1, f"--coop-n-ctx {cfg.coop_n_ctx}: CoOp needs at least 1 context token (default 16)"),
            (0 < cfg.coop_lr <= MAX_LR, f"--coop-lr {cfg.coop_lr}: the learning rate must lie in (0, {MAX_LR:g}]"),
            (cfg.tip_views >= 1, f"--tip-views {cfg.tip_views}: average at least 1 view per cache key"),
        ]
        check_kind(cfg.head)
        for ok, message in checks:
            if not ok:
                raise InputError(message)
        unknown = [g for g in cfg.mask_groups if g not in MASK_GROUPS]
        if unknown or not cfg.mask_groups:
            raise InputError(f"unknown mask group(s) {unknown or list(cfg.mask_groups)}: "
                             f"choose from {', '.join(MASK_GROUPS)}")
        if cfg.task is not None:
            check_task_name(cfg.task)
        if cfg.template is not None:
            check_template(cfg.template)
        return cfg

    def _check_finite(self) -> None:
        """Every number is a finite int or float (NaN and inf pass comparisons or break them silently)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or value is None or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                raise InputError(f"--{f.name.replace('_', '-')} {value}: must be a finite number")
