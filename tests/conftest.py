"""Shared fixtures: a tiny open_clip base saved as a local checkpoint, and task packs on it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

TINY_MODEL = "rmt-tiny-vit"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A seeded random rmt-tiny-vit saved as .safetensors, loaded as a user's checkpoint would be."""
    torch = pytest.importorskip("torch")
    from rmt_deploy.models import load_base, save_checkpoint

    torch.manual_seed(0)
    base = load_base(TINY_MODEL, None)
    return save_checkpoint(base.model, tmp_path_factory.mktemp("base") / "tiny.safetensors")


@pytest.fixture(scope="session")
def tiny_base(tiny_checkpoint):
    """The tiny base loaded back from its checkpoint file (do not modify in place)."""
    from rmt_deploy.models import load_base

    return load_base(TINY_MODEL, str(tiny_checkpoint))


@pytest.fixture(scope="session")
def make_taskpack(tiny_base):
    """Factory: a TaskPack on the tiny base with random masks (p zeros) and a random head."""
    from rmt_deploy.models import fingerprint, maskable_tensors
    from rmt_deploy.taskpack import TaskPack

    tensors = maskable_tensors(tiny_base.model)
    base_fp = fingerprint(TINY_MODEL, tensors)
    embed_dim = tiny_base.model.visual.output_dim

    def make(name: str, seed: int = 0, zeros: float = 0.05, classes: int = 3) -> TaskPack:
        rng = np.random.default_rng(seed)
        masks = {n: rng.random(tuple(t.shape)) >= zeros for n, t in tensors.items()}
        head = rng.standard_normal((classes, embed_dim)).astype(np.float32)
        head /= np.linalg.norm(head, axis=1, keepdims=True)
        return TaskPack(
            name=name,
            class_names=[f"class {i}" for i in range(classes)],
            head=head,
            masks=masks,
            base_fingerprint=base_fp,
            model_name=TINY_MODEL,
            logit_scale=100.0,
            template="a photo of a {}.",
        )

    return make
