"""The text-side class head, accuracy over a split, and `rmt-deploy eval` of a TaskPack."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from rmt_deploy.errors import InputError
from rmt_deploy.models import BaseModel, fingerprint, load_base
from rmt_deploy.taskpack import TaskPack
from rmt_deploy.training.data import Sample, build_dataset
from rmt_deploy.training.distributed import DistContext, resolve_device
from rmt_deploy.training.loading import ImageDataset, batches
from rmt_deploy.training.masking import apply_masks_


@torch.no_grad()
def class_head(base: BaseModel, class_names: Sequence[str], template: str, device: torch.device) -> torch.Tensor:
    """L2-normalised text embeddings of template.format(class) for every class: [C, D] float32."""
    if "{}" not in template:
        raise InputError(f"prompt template {template!r} has no '{{}}' for the class name")
    text_tower = base.model
    tokens = base.tokenizer([template.format(name) for name in class_names]).to(device)
    return F.normalize(text_tower.encode_text(tokens).float(), dim=-1)


def autocast_for(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA (scores and logits stay fp32), nothing on CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
    amp: bool = True,
) -> tuple[list[int], int]:
    """Correct top-1 predictions of each logit function over one pass of the loader, and the total."""
    correct, total = [0] * len(logit_fns), 0
    for images, labels in batches(loader):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast_for(device, amp):
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

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def evaluate_taskpack(
    task: str | Path, dataset: str, data_root: str | Path, pretrained: str | None, split: str = "test",
    batch_size: int = 64, device: str = "auto", workers: int = 2, shots: int = 0, seed: int = 1,
) -> EvalResult:
    """Top-1 accuracy of a TaskPack on a dataset split, on the base it was trained on."""
    pack = TaskPack.load(task)
    data = build_dataset(dataset, data_root, shots, seed)
    if data.class_names != pack.class_names:
        raise InputError(
            f"dataset {data.name} has classes {data.class_names[:4]}..., task '{pack.name}' was trained on "
            f"{pack.class_names[:4]}...: evaluate on the dataset the task was trained for"
        )
    dev = resolve_device(device)
    base = load_base(pack.model_name, pretrained, device=str(dev))
    params = dict(base.model.named_parameters())
    unknown = [n for n in pack.masks if n not in params]
    if unknown:
        raise InputError(f"task '{pack.name}' masks {unknown[0]!r}, which {pack.model_name} does not have")
    pack.check_base(fingerprint(pack.model_name, {n: params[n] for n in pack.masks}))
    apply_masks_(base.model, pack.masks)
    head = torch.from_numpy(pack.head).to(dev)

    def logits(images: torch.Tensor) -> torch.Tensor:
        return pack.logit_scale * F.normalize(base.model.encode_image(images).float(), dim=-1) @ head.t()

    samples = data.split(split)
    if not samples:
        raise InputError(f"split {split!r} of {data.name} is empty: choose another --split")
    loader = make_loader(samples, base.preprocess, batch_size, workers, dev)
    (correct,), total = count_correct([logits], loader, dev)
    return EvalResult(pack.name, data.name, split, correct / total, correct, total)


def sharded(samples: Sequence[Sample], dist: DistContext) -> list[Sample]:
    """This rank's share of an evaluation split (every world_size-th sample)."""
    return list(samples[dist.rank::dist.world_size])
