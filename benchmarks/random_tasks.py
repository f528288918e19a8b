"""Random bases and tasks for the benchmarks (no weights can be downloaded here).

    base = random_base("ViT-B-16", work)          # seeded random weights saved as a checkpoint
    base = random_base("convnext_tiny", work, groups=("mlp", "conv"))   # other mask groups (docs/families.md)
    pack = random_pack(base, "task0", np.random.default_rng(0), zeros=0.025, classes=47)

Needs torch for `random_base`; the packs are plain TaskPacks.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class RandomBase:
    """A seeded random open_clip base saved as a checkpoint, and what task packs need of it."""

    model_name: str
    checkpoint: Path
    shapes: dict[str, tuple[int, ...]]
    fingerprint: str
    embed_dim: int


def random_base(model_name: str, work: Path, seed: int = 0, checkpoint: str = "base.safetensors",
                groups: tuple[str, ...] = ("attn",)) -> RandomBase:
    """Random weights seeded by `seed`; the tasks mask the tensors of mask `groups`."""
    import torch

    from rmt_deploy.basemodel.loading import embed_dim, fingerprint, load_base, maskable_tensors, save_checkpoint

    torch.manual_seed(seed)
    base = load_base(model_name, None)
    saved = save_checkpoint(base.model, work / checkpoint)
    tensors = maskable_tensors(base.model, groups, model_name)
    return RandomBase(model_name, saved, {n: tuple(t.shape) for n, t in tensors.items()},
                      fingerprint(model_name, tensors), embed_dim(base.model))  # timm towers record no output_dim


def unit_rows(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """float32 rows of unit L2 norm."""
    rows = rng.standard_normal(shape).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def random_masks(rng: np.random.Generator, shapes: dict[str, tuple[int, ...]], zeros: float) -> dict[str, np.ndarray]:
    """i.i.d. masks dropping a `zeros` fraction (in steps of 1/65536: uint16 draws are 4x cheaper)."""
    threshold = int(round(zeros * 65536))
    return {n: rng.integers(0, 1 << 16, s, dtype=np.uint16) >= threshold for n, s in shapes.items()}


def random_pack(base: RandomBase, name: str, rng: np.random.Generator, zeros: float, classes: int,
                masks: dict[str, np.ndarray] | None = None, **fields: Any):
    """A TaskPack on `base` with random masks (or the given ones) and a random unit head."""
    from rmt_deploy.artifacts.task_file import TaskPack

    masks = random_masks(rng, base.shapes, zeros) if masks is None else masks
    return TaskPack(name=name, class_names=[f"c{i}" for i in range(classes)], head=unit_rows(rng, classes, base.embed_dim),
                    masks=masks, base_fingerprint=base.fingerprint, model_name=base.model_name, **fields)


def random_bundle(model_name: str, work: Path, names: list[str], zeros: float, classes: Callable[[int], int],
                  exported: list[str] | None = None, groups: tuple[str, ...] = ("attn",), **export: Any) -> Path:
    """work/bundle (made once): a random base masked in `groups`, one pack per name (seeded by its index) saved
    under work/tasks, and the bundle exported with `exported` (default: all of them) and `export` options."""
    bundle = work / "bundle"
    if (bundle / "manifest.json").is_file():
        return bundle
    from rmt_deploy.export import ExportConfig, export_bundle

    base = random_base(model_name, work, groups=groups)
    (work / "tasks").mkdir(exist_ok=True)
    paths = {name: random_pack(base, name, np.random.default_rng(index), zeros, classes(index))
             .save(work / "tasks" / f"{name}.rmtask") for index, name in enumerate(names)}
    export_bundle(ExportConfig(model_name, str(base.checkpoint), [paths[n] for n in exported or names], bundle,
                               verify=False, **export), progress=False)
    return bundle
