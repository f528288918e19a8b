"""Base models: open_clip loading, the weights RMT masks, and the base fingerprint.

Needs the `train` extra (torch, open_clip). A base is the pair (model name,
pretrained tag or local checkpoint path), built through open_clip's factory.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from rmt_deploy.artifacts.fingerprint import fingerprint_arrays
from rmt_deploy.basemodel.checkpoint_files import (
    check_checkpoint_file,
    checkpoint_names,
    inspect_checkpoint,
    read_openai_state_dict,
    save_weights,
)
from rmt_deploy.basemodel.mask_groups import MASK_GROUPS, select  # noqa: F401  (MASK_GROUPS public here too)
from rmt_deploy.errors import InputError, InternalError, MissingDependencyError, require

CONFIG_DIR = Path(__file__).parent / "model_configs"
CONFIG_PREPROCESS = CONFIG_DIR / "preprocess.json"  # eval preprocessing of our configs (not a model config)
_registered = False
_FUSED = "_rmt_reparameterized"
_TAG_PREPROCESS = ("mean", "std", "interpolation", "resize_mode")


@dataclass
class BaseModel:
    """A loaded open_clip model with its eval transform; its tokenizer is made at first use (SigLIP's needs
    `transformers` and Hugging Face files, which masking, export and benchmarks never need)."""

    model: Any
    preprocess: Callable
    model_name: str
    pretrained: str | None
    quick_gelu: bool = False  # the activation built (recorded in TaskPacks and bundles)

    @cached_property
    def tokenizer(self) -> Callable:
        try:
            return _open_clip().get_tokenizer(self.model_name)
        except Exception as exc:  # noqa: BLE001 - a missing package or tokenizer file, whichever open_clip hit
            reason = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise MissingDependencyError(
                f"{self.model_name}'s tokenizer cannot be made ({type(exc).__name__}: {reason}); "
                "SigLIP and other Hugging Face tokenizers need `pip install transformers` and the tokenizer "
                "files in the Hugging Face cache") from None


def _open_clip():
    """Import open_clip once and register rmt-deploy's bundled model configs."""
    global _registered
    require("torch", "train")
    open_clip = require("open_clip", "train")
    if not _registered:
        from rmt_deploy.basemodel.timm_towers import register_tiny_towers

        register_tiny_towers()
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True
    return open_clip


def list_models() -> list[str]:
    """Model names open_clip knows, including rmt-deploy's small configs."""
    return list(_open_clip().list_models())


def _resolve_pretrained(model_name: str, pretrained: str | None) -> tuple[str, str] | None:
    """("file", path) or ("tag", tag) for a pretrained argument; None for random weights."""
    if pretrained is None or pretrained == "":
        return None
    path = Path(pretrained).expanduser()
    if path.exists():
        return "file", str(check_checkpoint_file(path))
    open_clip = _open_clip()
    if pretrained in open_clip.list_pretrained_tags_by_model(model_name):
        return "tag", pretrained
    looks_like_path = any(ch in pretrained for ch in "/\\") or path.suffix in {".pt", ".pth", ".bin", ".safetensors"}
    if looks_like_path:
        raise InputError(f"checkpoint file {pretrained!r} does not exist: check the path")
    tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
    raise InputError(
        f"pretrained {pretrained!r} is neither a checkpoint file nor a tag of {model_name} "
        f"(tags: {tags})"
    )


@dataclass(frozen=True)
class Weights:
    """Where a base's weights lie and what they imply about the model built for them."""

    path: str | None  # a local file (a tag is downloaded through open_clip first); None = random
    quick_gelu: bool  # the activation the weights were trained with
    openai_format: bool = False  # OpenAI's JIT archive or state dict: converted here, not by open_clip
    preprocess: dict[str, Any] = field(default_factory=dict)  # the tag's preprocessing settings


def config_quick_gelu(model_name: str) -> bool:
    """The activation open_clip's config for this model name sets (e.g. ViT-B-16-quickgelu)."""
    config = _open_clip().get_model_config(model_name) or {}
    return bool(config.get("quick_gelu", False))


def tag_quick_gelu(model_name: str, tag: str) -> bool:
    """The activation a pretrained tag's weights were trained with (open_clip's registry, e.g. openai: True)."""
    cfg = _open_clip().get_pretrained_cfg(model_name, tag)
    return bool(cfg.get("quick_gelu", config_quick_gelu(model_name)))


def resolve_weights(model_name: str, pretrained: str | None) -> Weights:
    """The weights file and the activation for (model name, tag | checkpoint path | None)."""
    source = _resolve_pretrained(model_name, pretrained)
    if source is None:
        return Weights(None, config_quick_gelu(model_name), preprocess=config_preprocess(model_name))
    kind, value = source
    preprocess = config_preprocess(model_name)
    if kind == "tag":
        cfg = _open_clip().get_pretrained_cfg(model_name, value)
        preprocess = {k: cfg[k] for k in _TAG_PREPROCESS if k in cfg}
        value = _download(model_name, value, cfg)
        default = tag_quick_gelu(model_name, source[1])
    else:
        default = config_quick_gelu(model_name)
    info = inspect_checkpoint(value)
    quick_gelu = info.quick_gelu if info.quick_gelu is not None else default
    return Weights(value, quick_gelu, info.openai, preprocess)


def config_preprocess(model_name: str) -> dict[str, Any]:
    """The eval preprocessing a model's weights expect when no tag says it: our configs' (preprocess.json),
    or what every open_clip tag of the model agrees on (SigLIP: mean/std 0.5, squash; MobileCLIP: 0/1)."""
    import json

    ours = json.loads(CONFIG_PREPROCESS.read_text()).get(model_name)
    if isinstance(ours, dict):
        return {k: ours[k] for k in _TAG_PREPROCESS if k in ours}
    open_clip = _open_clip()
    settings = [{k: cfg[k] for k in _TAG_PREPROCESS if k in cfg}
                for cfg in (open_clip.get_pretrained_cfg(model_name, t)
                            for t in open_clip.list_pretrained_tags_by_model(model_name))]
    if settings and all(s == settings[0] for s in settings):
        return settings[0]
    return {}


def _download(model_name: str, tag: str, cfg: dict[str, Any]) -> str:
    open_clip = _open_clip()
    try:
        path = open_clip.pretrained.download_pretrained(cfg)
    except Exception as exc:  # noqa: BLE001  urllib, huggingface_hub and hash checks raise many types
        raise InputError(f"cannot download {model_name} weights for tag {tag!r} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else ''}): check the network, "
                         "or pass a local checkpoint file") from None
    if not path:
        raise InputError(f"open_clip has no download for {model_name} tag {tag!r}: pass a local checkpoint file")
    return str(path)


def load_base(model_name: str, pretrained: str | None = None, device: str = "cpu",
              quick_gelu: bool | None = None) -> BaseModel:
    """Build an open_clip model from a name and a tag, a local checkpoint path or None (random).

    The activation follows the weights (QuickGELU for OpenAI's; see resolve_weights);
    `quick_gelu` forces it, e.g. to rebuild the graph a task or bundle recorded.
    """
    open_clip = _open_clip()
    if model_name not in open_clip.list_models():
        raise InputError(
            f"model {model_name!r} is unknown to open_clip (e.g. ViT-B-16, ViT-B-32, rmt-tiny-vit; "
            "see open_clip.list_models())"
        )
    weights = resolve_weights(model_name, pretrained)
    act = weights.quick_gelu if quick_gelu is None else bool(quick_gelu)
    try:
        model, preprocess = _create(open_clip, model_name, weights, act, device)
    except Exception as exc:  # noqa: BLE001  torch.load, safetensors and pickle raise many types for a bad file
        if isinstance(exc, InputError):
            raise
        raise InputError(
            f"cannot load {model_name} weights from {pretrained!r}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:300] if str(exc) else ''}"
        ) from None
    if uses_quick_gelu(model) != act:
        raise InternalError(f"{model_name} was built with quick_gelu={not act}, asked for {act}")
    model.eval()
    reparameterize_(model)
    return BaseModel(model, preprocess, model_name, pretrained, act)


def _create(open_clip: Any, model_name: str, weights: Weights, quick_gelu: bool, device: str) -> tuple[Any, Any]:
    """open_clip's factory with the activation forced; OpenAI-format weights are converted, then loaded."""
    path = None if weights.openai_format else weights.path
    fused = path is not None and _holds_reparameterized(path)  # saved after load_base fused its branches
    if fused:
        path = None
    with _quiet_random_init(weights.openai_format or fused):  # the weights follow; "initialized randomly" would mislead
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=path, device=device, force_quick_gelu=quick_gelu, quick_gelu=quick_gelu,
            **{f"image_{k}": v for k, v in weights.preprocess.items()},
        )
    if fused:
        reparameterize_(model)
        open_clip.load_checkpoint(model, weights.path, strict=True, device=device)
    if weights.openai_format:
        state = read_openai_state_dict(weights.path)
        model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
    return model, preprocess


def _holds_reparameterized(path: str) -> bool:
    """Whether a checkpoint holds a timm tower's fused inference-time convs (timm names them reparam_conv)."""
    return any(".reparam_conv." in name for name in checkpoint_names(path))


def reparameterize_(model: Any) -> bool:
    """Fuse a timm tower's train-time branches (MobileCLIP's RepMixer, MobileOne) in place, as its authors do
    for inference: masks, fingerprints and exports then see the inference-time weights. True if anything changed."""
    visual = getattr(model, "visual", None)
    if type(visual).__name__ != "TimmModel" or visual.__dict__.get(_FUSED):
        return False  # timm's fusion is not idempotent: a second pass fails on the deleted branches
    from timm.utils.model import reparameterize_model

    before = [n for n, _ in visual.named_parameters()]
    reparameterize_model(visual, inplace=True)
    visual.__dict__[_FUSED] = True
    return [n for n, _ in visual.named_parameters()] != before


@contextlib.contextmanager
def _quiet_random_init(enabled: bool) -> Iterator[None]:
    """Drop open_clip's "No pretrained weights loaded" log record while a model is built for weights loaded after."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()
    if enabled:
        root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def uses_quick_gelu(model: Any) -> bool:
    """Whether the model's transformer blocks use open_clip's QuickGELU (OpenAI CLIP's activation)."""
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in model.modules())


def save_checkpoint(model: Any, path: str | Path) -> Path:
    """Save a model's state dict as .safetensors or a torch .pt file (by suffix), recording its activation."""
    return save_weights(model, path, uses_quick_gelu(model))


def maskable_tensors(model: Any, groups: Iterable[str] = ("attn",), model_name: str = "the model") -> dict[str, Any]:
    """The image-tower weights of mask `groups` (rmt_deploy.basemodel.mask_groups), by open_clip name, in model
    order; InputError for an unknown group or one the tower lacks."""
    params = dict(model.named_parameters())
    return {name: params[name] for name in select(model, groups, model_name)}


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


def embed_dim(model: Any) -> int:
    """The image embedding's width: open_clip towers record it; a timm tower's is read off one forward."""
    dim = getattr(model.visual, "output_dim", None)
    if isinstance(dim, int):
        return dim
    torch = require("torch", "train")
    size = preprocess_config(model)["image_size"]
    param = next(model.visual.parameters())
    with torch.no_grad():
        return int(model.visual(torch.zeros(1, 3, *size, device=param.device, dtype=param.dtype)).shape[-1])


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
