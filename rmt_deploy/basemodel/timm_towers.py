"""Tiny timm image towers for rmt-deploy's small configs (tests, demos): registered with timm on first use.

open_clip's TimmModel builds a trunk from a timm model name and passes no architecture
arguments, so a reduced-width tower needs a registered name. Each keeps its family's
structure (SigLIP's MAP-pooled ViT, MobileCLIP2's FastViT-MCi with RepMixer stages and an
attention last stage, ConvNeXt) at a width that trains in seconds on a CPU.
"""
from __future__ import annotations

from functools import partial

_registered = False
# timm reads a registered entry's pretrained config from its module's `default_cfgs` (no weights: url '')
default_cfgs = {name: {"url": "", "num_classes": 0} for name in ("rmt_vit_siglip_tiny", "rmt_fastvit_mci_tiny", "rmt_convnext_tiny")}


def register_tiny_towers() -> None:
    """Register rmt_vit_siglip_tiny, rmt_fastvit_mci_tiny and rmt_convnext_tiny with timm (once)."""
    global _registered
    if _registered:
        return
    from timm.models import register_model
    from timm.models.convnext import _create_convnext
    from timm.models.fastvit import RepConditionalPosEnc, _create_fastvit
    from timm.models.vision_transformer import _create_vision_transformer

    def rmt_vit_siglip_tiny(pretrained: bool = False, **kwargs):
        """SigLIP-style ViT (no class token, MAP pooling): 32 px, patch 8, 2 blocks, width 64."""
        args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, class_token=False,
                    global_pool="map")
        return _create_vision_transformer("rmt_vit_siglip_tiny", pretrained=pretrained, **dict(args, **kwargs))

    def rmt_fastvit_mci_tiny(pretrained: bool = False, **kwargs):
        """FastViT-MCi0 (MobileCLIP2-S0's tower) with 1-2-4-1 blocks (MCi0: 2-6-10-2) and a quarter of the widths."""
        args = dict(layers=(1, 2, 4, 1), embed_dims=(16, 32, 64, 128), mlp_ratios=(3, 3, 3, 3),
                    se_downsamples=(False, False, True, True),
                    pos_embs=(None, None, None, partial(RepConditionalPosEnc, spatial_shape=(7, 7))),
                    token_mixers=("repmixer", "repmixer", "repmixer", "attention"), lkc_use_act=True)
        return _create_fastvit("rmt_fastvit_mci_tiny", pretrained=pretrained, **dict(args, **kwargs))

    def rmt_convnext_tiny(pretrained: bool = False, **kwargs):
        """ConvNeXt with one block per stage, widths 16-128 (convnext_atto has 2-2-6-2, 40-320)."""
        args = dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))
        return _create_convnext("rmt_convnext_tiny", pretrained=pretrained, **dict(args, **kwargs))

    for entry in (rmt_vit_siglip_tiny, rmt_fastvit_mci_tiny, rmt_convnext_tiny):
        entry.__module__ = __name__
        register_model(entry)
    _registered = True
