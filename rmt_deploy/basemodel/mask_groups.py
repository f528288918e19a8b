"""Which image-tower weights a task masks: tower families and the named groups of their weights.

R-AMT is per-weight, so any named weight tensor can carry a mask. A group names the same
role in every family (docs/families.md):
  attn   every attention projection: open_clip ViT in_proj/out_proj, timm qkv/proj (ViT, SigLIP's
         MAP head, EVA's q/k/v, FastViT-MCi attention token mixers), RN50's attention pool q/k/v/c
  mlp    linear or 1x1-conv layers of MLP blocks (ViT c_fc/c_proj, timm fc1/fc2, FastViT ConvMlp)
  conv   every other convolution: k x k convs (patch embeddings, depthwise, reparameterised
         RepMixer/MobileOne convs) and 1x1 convs outside MLPs (ResNet bottlenecks, SE blocks)
  conv1  the tower's first convolution only (a ViT's patch embedding)
Biases, norms, embeddings, layer scales and the final projection are never masked.
"""
from __future__ import annotations

from typing import Any, Iterable

from rmt_deploy.errors import InputError

MASK_GROUPS = ("attn", "mlp", "conv1", "conv")
MIN_SHARE = 0.20  # the trainer refuses groups covering less of the image tower's weights than this
FAMILIES = {  # family -> what it is; the timm ones by trunk class
    "open_clip-vit": "open_clip VisionTransformer",
    "open_clip-resnet": "open_clip ModifiedResNet (RN50, ...)",
    "timm-vit": "timm VisionTransformer (ViT, SigLIP, SigLIP2)",
    "timm-eva": "timm Eva (EVA02)",
    "timm-fastvit": "timm FastVit (MobileCLIP / MobileCLIP2 FastViT-MCi)",
    "timm-convnext": "timm ConvNeXt",
}
_TIMM_TRUNKS = {"VisionTransformer": "timm-vit", "Eva": "timm-eva", "FastVit": "timm-fastvit",
                "ConvNeXt": "timm-convnext"}


def tower_family(model: Any) -> str:
    """The family of `model.visual`, or InputError naming the tower and the supported families."""
    visual = getattr(model, "visual", None)
    kind = type(visual).__name__
    if kind == "VisionTransformer" and type(visual).__module__.startswith("open_clip"):
        return "open_clip-vit"
    if kind == "ModifiedResNet":
        return "open_clip-resnet"
    if kind == "TimmModel":
        trunk = type(visual.trunk).__name__
        if trunk in _TIMM_TRUNKS:
            return _TIMM_TRUNKS[trunk]
        kind = f"TimmModel({trunk})"
    raise InputError(f"image tower {kind} is not a supported family: choose a model whose tower is one of "
                     f"{'; '.join(FAMILIES.values())}")


def _is_attention(module: Any) -> bool:
    name = type(module).__name__
    return name == "MultiheadAttention" or name.endswith("Attention") or "AttentionPool" in name


def _is_mlp(module: Any, path: str) -> bool:
    return "Mlp" in type(module).__name__ or path.rpartition(".")[2] == "mlp"


def _weight_kind(owner: Any, leaf: str, ndim: int) -> str | None:
    """"matrix" (a linear or 1x1-conv weight), "conv" (k x k) or None (not a maskable weight)."""
    from torch import nn

    if isinstance(owner, nn.MultiheadAttention) and leaf.endswith("proj_weight"):
        return "matrix"
    if leaf != "weight":
        return None
    if isinstance(owner, nn.Linear):
        return "matrix"
    if isinstance(owner, nn.modules.conv._ConvNd) and ndim >= 3:
        return "matrix" if all(k == 1 for k in owner.kernel_size) else "conv"
    return None


def group_tensors(model: Any) -> dict[str, list[str]]:
    """Every group's tensors in `model.visual`, by full name ("visual....") in model order."""
    from torch import nn

    tower_family(model)
    modules = dict(model.visual.named_modules())
    groups: dict[str, list[str]] = {g: [] for g in MASK_GROUPS}
    for name, param in model.visual.named_parameters():
        owner_path, _, leaf = name.rpartition(".")
        owner = modules[owner_path]
        kind = _weight_kind(owner, leaf, param.ndim)
        role = None if kind is None else "conv" if kind == "conv" else _role(modules, owner_path)
        if role is None and kind == "matrix" and isinstance(owner, nn.modules.conv._ConvNd):
            role = "conv"  # a 1x1 conv outside MLPs and attention (ResNet bottleneck, squeeze-excite)
        if role is not None:
            groups[role].append(f"visual.{name}")
    groups["conv1"] = groups["conv"][:1]
    return groups


def _role(modules: dict[str, Any], owner_path: str) -> str | None:
    """"mlp" or "attn" from the innermost enclosing MLP or attention module; None outside both."""
    parts = owner_path.split(".") if owner_path else []
    for depth in range(len(parts), -1, -1):
        path = ".".join(parts[:depth])
        module = modules[path]
        if _is_mlp(module, path):
            return "mlp"
        if _is_attention(module):
            return "attn"
    return None


def check_groups(groups: Iterable[str]) -> tuple[str, ...]:
    """The groups as a tuple, or InputError naming an unknown one and the choices."""
    groups = tuple(groups)
    unknown = [g for g in groups if g not in MASK_GROUPS]
    if unknown or not groups:
        raise InputError(f"unknown mask group(s) {unknown or list(groups)}: choose from {', '.join(MASK_GROUPS)}")
    return groups


def select(model: Any, groups: Iterable[str], model_name: str = "the model") -> list[str]:
    """The tensor names of `groups` (deduplicated, model order); InputError for a group the tower lacks."""
    groups = check_groups(groups)
    table = group_tensors(model)
    lacking = [g for g in groups if not table[g]]
    if lacking:
        has = [g for g in MASK_GROUPS if table[g]]
        raise InputError(f"{model_name}'s image tower ({tower_family(model)}) has no weights in mask group "
                         f"{', '.join(lacking)}: choose from {', '.join(has) or 'none'}")
    wanted = {n for g in groups for n in table[g]}
    return [f"visual.{n}" for n, _ in model.visual.named_parameters() if f"visual.{n}" in wanted]


def share(model: Any, names: Iterable[str]) -> float:
    """Fraction of the image tower's parameters held by the tensors `names`."""
    params = {f"visual.{n}": p for n, p in model.visual.named_parameters()}
    total = sum(p.numel() for p in params.values())
    return sum(params[n].numel() for n in set(names)) / max(total, 1)


def check_share(model: Any, groups: Iterable[str], model_name: str) -> None:
    """InputError naming better groups when `groups` cover under MIN_SHARE of the image tower (a near no-op)."""
    groups = check_groups(groups)
    have = share(model, select(model, groups, model_name))
    if have >= MIN_SHARE:
        return
    table = group_tensors(model)
    extra = [g for g in ("mlp", "conv", "attn") if table[g] and g not in groups]
    suggestion, value = list(groups), have
    for group in extra:
        if value >= MIN_SHARE:
            break
        suggestion.append(group)
        value = share(model, select(model, suggestion, model_name))
    raise InputError(f"mask group(s) {','.join(groups)} cover {have:.0%} of {model_name}'s image-tower weights "
                     f"(under {MIN_SHARE:.0%}, the masks would barely change it): use --mask-groups "
                     f"{','.join(suggestion)} ({value:.0%})")
