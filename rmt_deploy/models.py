"""Base models: open_clip loading, the weights RMT masks, and the base fingerprint.

Needs the `train` extra (torch, open_clip). A base is the pair (model name,
pretrained tag or local checkpoint path), built through open_clip's factory.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from rmt_deploy.errors import InputError, require
from rmt_deploy.fingerprint import fingerprint_arrays

CONFIG_DIR = Path(__file__).parent / "model_configs"
MASK_GROUPS = ("attn", "mlp", "conv1")
_GROUP_SUFFIXES = {
    "attn": ("attn.in_proj_weight", "attn.out_proj.weight"),
    "mlp": ("mlp.c_fc.weight", "mlp.c_proj.weight"),
}
_registered = False


@dataclass
class BaseModel:
    """A loaded open_clip model with its eval transform and tokenizer."""

    model: Any
    preprocess: Callable
    tokenizer: Callable
    model_name: str
    pretrained: str | None


def _open_clip():
    """Import open_clip once and register rmt-deploy's bundled model configs."""
    global _registered
    require("torch", "train")
    open_clip = require("open_clip", "train")
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True
    return open_clip


def list_models() -> list[str]:
    """Model names open_clip knows, including rmt-deploy's small configs."""
    return list(_open_clip().list_models())


def _resolve_pretrained(model_name: str, pretrained: str | None) -> str | None:
    if pretrained is None or pretrained == "":
        return None
    path = Path(pretrained).expanduser()
    if path.exists():
        if not path.is_file():
            raise InputError(f"pretrained path {pretrained!r} is not a file: pass a checkpoint file")
        return str(path)
    open_clip = _open_clip()
    if pretrained in open_clip.list_pretrained_tags_by_model(model_name):
        return pretrained
    looks_like_path = any(ch in pretrained for ch in "/\\") or path.suffix in {".pt", ".pth", ".bin", ".safetensors"}
    if looks_like_path:
        raise InputError(f"checkpoint file {pretrained!r} does not exist: check the path")
    tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
    raise InputError(
        f"pretrained {pretrained!r} is neither a checkpoint file nor a tag of {model_name} "
        f"(tags: {tags})"
    )


def load_base(model_name: str, pretrained: str | None = None, device: str = "cpu") -> BaseModel:
    """Build an open_clip model from a name and a tag, a local checkpoint path or None (random)."""
    open_clip = _open_clip()
    if model_name not in open_clip.list_models():
        raise InputError(
            f"model {model_name!r} is unknown to open_clip (e.g. ViT-B-16, ViT-B-32, rmt-tiny-vit; "
            "see open_clip.list_models())"
        )
    source = _resolve_pretrained(model_name, pretrained)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=source, device=device
        )
    except Exception as exc:  # noqa: BLE001  torch.load, safetensors and pickle raise many types for a bad file
        if isinstance(exc, InputError):
            raise
        raise InputError(
            f"cannot load {model_name} weights from {pretrained!r}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:300]}"
        ) from None
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    return BaseModel(model, preprocess, tokenizer, model_name, pretrained)


def save_checkpoint(model: Any, path: str | Path) -> Path:
    """Save a model's state dict as .safetensors or a torch .pt file (by suffix)."""
    torch = require("torch", "train")
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, str(path))
    return path


def maskable_tensors(model: Any, groups: Iterable[str] = ("attn",)) -> dict[str, Any]:
    """The image-encoder weights RMT masks, by open_clip name, in model order."""
    groups = tuple(groups)
    unknown = [g for g in groups if g not in MASK_GROUPS]
    if unknown or not groups:
        raise InputError(f"unknown mask group(s) {unknown or groups}: choose from {', '.join(MASK_GROUPS)}")
    suffixes = tuple(s for g in groups for s in _GROUP_SUFFIXES.get(g, ()))
    selected = {}
    for name, param in model.named_parameters():
        if not name.startswith("visual."):
            continue
        if name.endswith(suffixes) and ".resblocks." in name:
            selected[name] = param
        elif "conv1" in groups and name == "visual.conv1.weight":
            selected[name] = param
    if not selected:
        raise InputError(
            f"model has no visual weights in group(s) {', '.join(groups)}: "
            "rmt-deploy masks ViT image encoders (open_clip VisionTransformer)"
        )
    return selected


def tensor_to_numpy(tensor: Any) -> np.ndarray:
    """A CPU numpy copy of a tensor (bf16 is widened to float32)."""
    torch = require("torch", "train")
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.contiguous().numpy()


def fingerprint(model_name: str, tensors: dict[str, Any]) -> str:
    """sha256 of the masked tensors' base values plus the model name (see DESIGN.md)."""
    return fingerprint_arrays(model_name, {n: tensor_to_numpy(t) for n, t in tensors.items()})


def preprocess_config(model: Any) -> dict[str, Any]:
    """open_clip's eval preprocessing settings for this model, JSON-able."""
    open_clip = _open_clip()
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    size = [int(size), int(size)] if isinstance(size, int) else [int(s) for s in size]
    return {
        "image_size": size,
        "mean": [float(m) for m in cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)],
        "std": [float(s) for s in cfg.get("std", open_clip.OPENAI_DATASET_STD)],
        "interpolation": str(cfg.get("interpolation", "bicubic")),
        "resize_mode": str(cfg.get("resize_mode", "shortest")),
    }
