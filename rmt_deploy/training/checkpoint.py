"""Per-epoch training checkpoints: scores, optimizer, scheduler and every RNG, written atomically.

Checkpoints are this trainer's own files (torch.save of tensors and plain
containers) and are read back with `weights_only=True`, so loading never runs
arbitrary pickled code.
"""
from __future__ import annotations

import io
import random
import re
from pathlib import Path
from typing import Any

import torch

from rmt_deploy.artifacts.integrity import check_regular_file
from rmt_deploy.artifacts.staging import write_atomic
from rmt_deploy.basemodel.checkpoint_files import MAX_CHECKPOINT_BYTES
from rmt_deploy.errors import ArtifactError, InputError

FORMAT = "rmt-deploy.train-checkpoint"
VERSION = 1
FOLDER = "checkpoints"
_NAME = re.compile(r"^epoch_(\d{4,})\.pt$")


def capture_rng(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """The global torch/CUDA/python RNG states plus the named generators' states."""
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    """Put back what `capture_rng` saved."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    for name, g in generators.items():
        g.set_state(state["generators"][name])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(out: Path, epoch: int) -> Path:
    return out / FOLDER / f"epoch_{epoch:04d}.pt"


def save(out: Path, epoch: int, payload: dict[str, Any], keep: int = 1) -> Path:
    """Write checkpoint `epoch` atomically (temp file, fsync, rename); keep the newest `keep`."""
    folder = out / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(out, epoch)
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, "epoch": epoch, **payload}, buffer)
    write_atomic(path, buffer.getvalue())
    if keep > 0:
        for old in _all(out)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def _all(out: Path) -> list[Path]:
    folder = out / FOLDER
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_latest(out: Path) -> dict[str, Any]:
    """The newest checkpoint under out/checkpoints; InputError when there is none."""
    paths = _all(out)
    if not paths:
        raise InputError(
            f"--resume: no checkpoint in {str(out / FOLDER)!r}: run without --resume to start training"
        )
    path = paths[-1]
    check_regular_file(path, MAX_CHECKPOINT_BYTES, "training checkpoint (.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged file
        raise ArtifactError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("version") != VERSION:
        raise ArtifactError(f"{path}: not an rmt-deploy training checkpoint of version {VERSION}")
    return state
