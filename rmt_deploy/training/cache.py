"""Tip-Adapter's cache model over the masked image encoder (the `tip-adapter` heads).

Tip-Adapter (Zhang et al., ECCV 2022), as its public code builds it: keys = the few-shot
training images' features averaged over 10 augmented views (random resized crop 0.5-1,
flip), then L2-normalised; values = one-hot labels; logits = zero-shot logits +
alpha * exp(-beta * (1 - f @ keys.T)) @ values. alpha and beta are searched on the
validation split over a grid (200 betas, 20 alphas from 0.1 up to the dataset's search
scale), keeping the first best. Tip-Adapter-F fine-tunes the keys (AdamW lr 1e-3, eps 1e-4,
cosine per step, 20 epochs, batch 256) before the search. Here the encoder is the task's
masked one, and keys are rounded to fp16 before the search, so the searched alpha and beta
fit the stored cache exactly; logits come from rmt_deploy.artifacts.heads, the runtime's function.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rmt_deploy.artifacts.heads import Cache
from rmt_deploy.training.datasets import Sample
from rmt_deploy.training.loading import SeededSampler, batches

AUGMENT_VIEWS = 10
SEARCH_STEPS = (200, 20)  # beta, alpha
DEFAULT_SEARCH_SCALE = (7.0, 3.0)  # Tip-Adapter's ImageNet / OxfordPets / UCF101 scale
INIT_BETA, INIT_ALPHA = 1.0, 1.17
# Tip-Adapter's per-dataset configs: (beta scale, alpha scale) of the search grid
SEARCH_SCALES = {
    "caltech101": (12.0, 5.0), "dtd": (13.0, 13.0), "eurosat": (12.0, 10.0), "fgvc_aircraft": (30.0, 30.0),
    "food101": (10.0, 10.0), "imagenet": (7.0, 3.0), "oxford_flowers": (50.0, 50.0), "oxford_pets": (7.0, 3.0),
    "stanford_cars": (20.0, 10.0), "sun397": (12.0, 10.0), "ucf101": (7.0, 3.0),
}
FINETUNE_LR, FINETUNE_EPS, FINETUNE_EPOCHS, FINETUNE_BATCH = 1e-3, 1e-4, 20, 256


@dataclass(frozen=True)
class Search:
    """The searched alpha, beta and the validation accuracy they reach."""

    alpha: float
    beta: float
    val_accuracy: float | None


def grid(scale: tuple[float, float], steps: tuple[int, int] = SEARCH_STEPS) -> tuple[list[float], list[float]]:
    """Tip-Adapter's grid: steps values from 0.1 upwards, spaced (scale - 0.1) / steps."""
    return tuple([i * (s - 0.1) / n + 0.1 for i in range(n)] for s, n in zip(scale, steps))  # type: ignore


@torch.no_grad()
def features(encode: Callable[[torch.Tensor], torch.Tensor], loader: Any, device: torch.device) -> tuple:
    """(unnormalised float32 features [N, D], labels [N]) over one pass of a loader, in its order."""
    feats, labels = [], []
    for images, target in batches(loader):
        feats.append(encode(images.to(device)).float().cpu())
        labels.append(target)
    return torch.cat(feats), torch.cat(labels)


def cache_keys(encode: Callable, make_loader: Callable[[SeededSampler], Any], samples: Sequence[Sample],
               seed: int, device: torch.device, views: int = AUGMENT_VIEWS) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (mean over `views` augmented views, L2-normalised) and labels of the training images."""
    sampler = SeededSampler(samples, num_replicas=1, rank=0, shuffle=False, seed=seed)
    total, labels = None, None
    for view in range(views):
        sampler.set_epoch(view)  # a different seeded augmentation per view
        feats, labels = features(encode, make_loader(sampler), device)
        total = feats if total is None else total + feats
    return F.normalize(total / views, dim=-1), labels


def search(val: np.ndarray, val_labels: np.ndarray, text: np.ndarray, logit_scale: float, keys: np.ndarray,
           labels: np.ndarray, scale: tuple[float, float]) -> Search:
    """The (alpha, beta) of the grid with the best validation accuracy (the first best, as Tip-Adapter)."""
    classes = text.shape[0]
    probe = Cache(keys.astype(np.float16), labels.astype(np.int64), 1.0, 1.0)
    values = probe.values(classes)
    zero_shot = np.float32(logit_scale) * (val @ text.T.astype(np.float32))
    affinity = val @ probe.keys.astype(np.float32).T
    betas, alphas = grid(scale)
    best = Search(INIT_ALPHA, INIT_BETA, -1.0)
    for beta in betas:
        votes = np.exp(np.float32(beta) * (affinity - np.float32(1.0))) @ values
        for alpha in alphas:
            accuracy = float(np.mean((zero_shot + np.float32(alpha) * votes).argmax(1) == val_labels))
            if accuracy > best.val_accuracy:
                best = Search(alpha, beta, accuracy)
    return best


def build_cache(keys: torch.Tensor, labels: torch.Tensor, text: np.ndarray, logit_scale: float,
                val: tuple[torch.Tensor, torch.Tensor] | None, scale: tuple[float, float]) -> tuple[Cache, Search]:
    """The stored cache (fp16 keys) with alpha and beta searched on `val` (features, labels)."""
    keys16 = keys.cpu().numpy().astype(np.float16)
    labels64 = labels.cpu().numpy().astype(np.int64)
    if val is None or not len(val[1]):
        warnings.warn("no validation images: tip-adapter keeps alpha 1.17, beta 1 (Tip-Adapter's initial values)",
                      stacklevel=2)
        found = Search(INIT_ALPHA, INIT_BETA, None)
    else:
        val_features = F.normalize(val[0], dim=-1).numpy().astype(np.float32)
        found = search(val_features, val[1].numpy(), text, logit_scale, keys16, labels64, scale)
    cache = Cache.build(keys16, labels64, found.alpha, found.beta, text.shape[0], text.shape[1])
    return cache, found


def finetune_keys(keys: torch.Tensor, labels: torch.Tensor, encode: Callable, make_loader: Callable,
                  samples: Sequence[Sample], text: torch.Tensor, logit_scale: float, seed: int,
                  device: torch.device, epochs: int = FINETUNE_EPOCHS) -> torch.Tensor:
    """Tip-Adapter-F: the keys trained on the cross-entropy of the Tip-Adapter logits (alpha, beta at
    their initial values), over freshly augmented training views each epoch; the encoder stays fixed."""
    adapter = torch.nn.Parameter(keys.clone().to(device))
    optimizer = torch.optim.AdamW([adapter], lr=FINETUNE_LR, eps=FINETUNE_EPS)
    sampler = SeededSampler(samples, num_replicas=1, rank=0, shuffle=True, seed=seed + 7)
    steps = epochs * max(1, -(-len(samples) // FINETUNE_BATCH))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    values = F.one_hot(labels.to(device), text.shape[0]).float()
    for epoch in range(epochs):
        sampler.set_epoch(AUGMENT_VIEWS + epoch)
        for images, target in batches(make_loader(sampler)):
            with torch.no_grad():
                f = F.normalize(encode(images.to(device)).float(), dim=-1)
            affinity = f @ adapter.t()
            tip = logit_scale * f @ text.t() + INIT_ALPHA * torch.exp(INIT_BETA * (affinity - 1.0)) @ values
            loss = F.cross_entropy(tip, target.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return adapter.detach()
