"""What a local checkpoint file says about its model: OpenAI's format, or the activation rmt-deploy recorded.

OpenAI CLIP weights were trained with QuickGELU, and open_clip 3.x no longer
switches the activation for them, so the format is recognised here as open_clip
itself recognises it: a TorchScript archive (OpenAI's released .pt files), or a
state dict carrying OpenAI's `input_resolution` / `context_length` /
`vocab_size` entries. rmt-deploy's own `save_checkpoint` records the activation
(safetensors metadata, or a `quick_gelu` entry beside a .pt `state_dict`).
Needs the `train` extra.
"""
from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rmt_deploy.artifacts.integrity import check_regular_file
from rmt_deploy.errors import InputError, require

OPENAI_KEYS = ("input_resolution", "context_length", "vocab_size")
QUICK_GELU_META = "rmt_deploy.quick_gelu"  # safetensors metadata key written by save_checkpoint
QUICK_GELU_ENTRY = "quick_gelu"  # .pt: {"state_dict": ..., "quick_gelu": bool}
MAX_CHECKPOINT_BYTES = 128 << 30  # the largest open_clip towers hold ~5 B parameters (20 GB in fp32)
CHECKPOINT = "checkpoint (.pt, .bin, .safetensors)"


def check_checkpoint_file(path: str | Path) -> Path:
    """`path` if it is a regular file of a checkpoint's size; InputError naming it (a directory, a FIFO...)."""
    check_regular_file(path, MAX_CHECKPOINT_BYTES, CHECKPOINT, InputError)
    return Path(path)


@dataclass(frozen=True)
class CheckpointInfo:
    """openai: the file is in OpenAI's format (QuickGELU; rmt-deploy converts it);
    quick_gelu: the activation the file implies or records, None when it does not say."""

    openai: bool = False
    quick_gelu: bool | None = None


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive (a zip holding constants.pkl), as OpenAI's released CLIP files are."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Read only what is needed to tell the format; an unreadable file says nothing (loading reports it)."""
    path = Path(path)
    if is_torchscript(path):
        return CheckpointInfo(openai=True, quick_gelu=True)
    if path.suffix == ".safetensors":
        return _inspect_safetensors(path)
    torch = require("torch", "train")
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001  a damaged or foreign file: open_clip's loader names the problem
        return CheckpointInfo()
    if not isinstance(loaded, dict):
        return CheckpointInfo()
    if isinstance(loaded.get(QUICK_GELU_ENTRY), bool):
        return CheckpointInfo(quick_gelu=loaded[QUICK_GELU_ENTRY])
    state = loaded.get("state_dict", loaded)
    if isinstance(state, dict) and any(_strip(k) in OPENAI_KEYS for k in state):
        return CheckpointInfo(openai=True, quick_gelu=True)
    return CheckpointInfo()


def checkpoint_names(path: str | Path) -> list[str]:
    """The tensor names a checkpoint holds (prefix "module." dropped); [] for a file that cannot be read so."""
    path = Path(path)
    if is_torchscript(path):
        return []
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as handle:
                return [_strip(k) for k in handle.keys()]
        torch = require("torch", "train")
        loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001  a damaged or foreign file: open_clip's loader names the problem
        return []
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else {}
    return [_strip(k) for k in state] if isinstance(state, dict) else []


def _inspect_safetensors(path: Path) -> CheckpointInfo:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            meta = handle.metadata() or {}
            keys = list(handle.keys())
    except Exception:  # noqa: BLE001  as above
        return CheckpointInfo()
    if any(_strip(k) in OPENAI_KEYS for k in keys):
        return CheckpointInfo(openai=True, quick_gelu=True)
    recorded = meta.get(QUICK_GELU_META)
    return CheckpointInfo(quick_gelu={"true": True, "false": False}.get(recorded))


def read_openai_state_dict(path: str | Path) -> dict[str, Any]:
    """OpenAI-format weights as an open_clip float32 state dict (OpenAI's extra entries dropped)."""
    torch = require("torch", "train")
    path = Path(path)
    try:
        if is_torchscript(path):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still the reader
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
    except Exception as exc:  # noqa: BLE001  torch raises many types for a damaged file
        raise InputError(f"cannot read OpenAI-format weights {str(path)!r}: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from None
    return {_strip(k): v.float() if v.is_floating_point() else v
            for k, v in state.items() if _strip(k) not in OPENAI_KEYS}


def save_weights(model: Any, path: str | Path, quick_gelu: bool) -> Path:
    """Save a model's state dict as .safetensors or a torch .pt file (by suffix), recording its activation."""
    torch = require("torch", "train")
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata={QUICK_GELU_META: "true" if quick_gelu else "false"})
    else:
        torch.save({"state_dict": state, QUICK_GELU_ENTRY: bool(quick_gelu)}, str(path))
    return path


def _strip(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key
