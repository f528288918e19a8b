"""The text-side class head, accuracy over a split, and `rmt-deploy eval` of a TaskPack."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rmt_deploy.artifacts import heads
from rmt_deploy.artifacts.task_file import TaskPack
from rmt_deploy.basemodel.loading import BaseModel, fingerprint, load_base, preprocess_config
from rmt_deploy.errors import InputError
from rmt_deploy.training.data import build_dataset
from rmt_deploy.training.datasets import FewShotData, Sample, check_template
from rmt_deploy.training.distributed import DistContext, resolve_device
from rmt_deploy.training.loading import ImageDataset, batches, eval_transform
from rmt_deploy.training.masking import apply_masks_
from rmt_deploy.training.precision import DEFAULT_PRECISION, autocast, check_precision, class_logits


@torch.no_grad()
def class_head(base: BaseModel, class_names: Sequence[str], template: str, device: torch.device) -> torch.Tensor:
    """L2-normalised text embeddings of template.format(class) for every class: [C, D] float32."""
    check_template(template)
    text_tower = base.model
    tokens = base.tokenizer([template.format(name) for name in class_names]).to(device)
    return F.normalize(text_tower.encode_text(tokens).float(), dim=-1)


def make_loader(samples: Sequence[Sample], transform: Callable, batch_size: int, workers: int,
                device: torch.device, **kwargs: Any) -> torch.utils.data.DataLoader:
    """A DataLoader over image files; pinned memory on CUDA."""
    return torch.utils.data.DataLoader(
        ImageDataset(samples, transform), batch_size=batch_size, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=False, **kwargs,
    )


@torch.no_grad()
def count_correct(
    logit_fns: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    precision: str = DEFAULT_PRECISION,
) -> tuple[list[int], int]:
    """Correct top-1 predictions of each logit function over one pass of the loader, and the total."""
    correct, total = [0] * len(logit_fns), 0
    for images, labels in batches(loader):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, precision):
            for i, fn in enumerate(logit_fns):
                correct[i] += int((fn(images).argmax(-1) == labels).sum())
        total += int(labels.numel())
    return correct, total


@dataclass
class EvalResult:
    """Accuracy of a task on one split."""

    task: str
    dataset: str
    split: str
    accuracy: float
    correct: int
    total: int
    zero_shot: bool = False  # measured with the masks off

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class EvalConfig:
    """One `rmt-deploy eval`: a task file, the data to score it on and how."""

    task: str | Path
    dataset: str
    data_root: str | Path
    pretrained: str | None = None
    split: str = "test"
    batch_size: int = 64
    device: str = "auto"
    workers: int = 2
    shots: int = 0  # few-shot sample of train/val; 0 = the full split
    seed: int = 1
    precision: str = DEFAULT_PRECISION
    subsample: str = "all"  # base-to-new: "base" or "new" half of the classes
    text_head: bool = False  # classes the task was not trained on: encode them with its template
    zero_shot: bool = False  # leave the masks off: zero-shot CLIP with the same head, the baseline


def evaluate_taskpack(config: EvalConfig) -> EvalResult:
    """Top-1 accuracy of a TaskPack on a dataset split, on the base (and activation) it was trained on."""
    pack = TaskPack.load(config.task)
    data = build_dataset(config.dataset, config.data_root, config.shots, config.seed, config.subsample)
    dev = resolve_device(config.device)
    precision = check_precision(config.precision, dev)
    base = load_base(pack.model_name, config.pretrained, device=str(dev), quick_gelu=pack.quick_gelu)
    params = dict(base.model.named_parameters())
    unknown = [n for n in pack.masks if n not in params]
    if unknown:
        raise InputError(f"task '{pack.name}' masks {unknown[0]!r}, which {pack.model_name} does not have")
    pack.check_base(fingerprint(pack.model_name, {n: params[n] for n in pack.masks}))
    head = task_head(pack, data, base, dev, config.text_head)
    cache = None if config.zero_shot else task_cache(pack, data)
    if not config.zero_shot:
        apply_masks_(base.model, pack.masks)
    math = heads.HeadMath(head.cpu().numpy(), pack.logit_scale, cache) if cache is not None else None

    def logits(images: torch.Tensor) -> torch.Tensor:
        if math is not None:  # the runtime's numpy head, as the trainer scored it
            features = F.normalize(base.model.encode_image(images).float(), dim=-1).cpu().numpy()
            return torch.from_numpy(math.logits(features)).to(images.device)
        return class_logits(base.model.encode_image(images), head, pack.logit_scale)

    samples = data.split(config.split)
    if not samples:
        raise InputError(f"split {config.split!r} of {data.name} is empty: choose another --split")
    loader = make_loader(samples, eval_transform(preprocess_config(base.model)), config.batch_size, config.workers,
                         dev)
    (correct,), total = count_correct([logits], loader, dev, precision)
    return EvalResult(pack.name, data.name, config.split, correct / total, correct, total, config.zero_shot)


def task_cache(pack: TaskPack, data: FewShotData) -> heads.Cache | None:
    """A tip-adapter pack's cache for the dataset's classes: all of it, or the keys of a class subset
    (labels renumbered); None for other kinds, or for classes the task has no keys for (text head alone)."""
    if pack.cache is None:
        return None
    if data.class_names == pack.class_names:
        return pack.cache
    index = {name: i for i, name in enumerate(pack.class_names)}
    if not all(name in index for name in data.class_names):
        return None
    rows = [index[name] for name in data.class_names]
    renumber = {old: new for new, old in enumerate(rows)}
    keep = np.isin(pack.cache.labels, rows)
    labels = np.array([renumber[int(label)] for label in pack.cache.labels[keep]], dtype=np.int64)
    return heads.Cache.build(pack.cache.keys[keep], labels, pack.cache.alpha, pack.cache.beta, len(rows),
                             pack.cache.keys.shape[1])


def task_head(pack: TaskPack, data: FewShotData, base: BaseModel, device: torch.device,
              text_head: bool = False) -> torch.Tensor:
    """The head rows for the dataset's classes: the task's own, a subset of them, or (text_head) encoded anew.

    Call before masks are applied: a text head comes from the unmasked text tower, as in training.
    """
    head = torch.from_numpy(pack.head).to(device)
    if data.class_names == pack.class_names:
        return head
    if data.parent_classes == pack.class_names and data.parent_index is not None:
        return head[data.parent_index]  # ImageNet-A/R, or a base/new half of the task's own classes
    index = {name: i for i, name in enumerate(pack.class_names)}
    if all(name in index for name in data.class_names) and len(index) == len(pack.class_names):
        return head[[index[name] for name in data.class_names]]
    if text_head:
        return class_head(base, data.class_names, pack.template or data.template, device)
    missing = [name for name in data.class_names if name not in index]
    raise InputError(
        f"dataset {data.name} has classes the task '{pack.name}' was not trained on "
        f"(e.g. {(missing or data.class_names)[0]!r}): evaluate on its dataset or a class subset of it, "
        "or pass --text-head to encode the new classes with the task's template"
    )


def sharded(samples: Sequence[Sample], dist: DistContext) -> list[Sample]:
    """This rank's share of an evaluation split (every world_size-th sample)."""
    return list(samples[dist.rank::dist.world_size])
