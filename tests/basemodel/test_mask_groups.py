"""Mask groups per tower family: which weights each group names, one-line errors, reparameterised towers."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("timm")

from rmt_deploy.basemodel import mask_groups  # noqa: E402
from rmt_deploy.basemodel.loading import fingerprint, load_base, maskable_tensors, preprocess_config  # noqa: E402
from rmt_deploy.errors import InputError  # noqa: E402

FAMILIES = {
    "rmt-tiny-vit": "open_clip-vit", "rmt-tiny-timm-vit": "timm-vit", "rmt-tiny-mobileclip2": "timm-fastvit",
    "rmt-tiny-convnext": "timm-convnext", "rmt-tiny-rn": "open_clip-resnet",
}


@pytest.fixture(scope="module")
def bases():
    import torch

    torch.manual_seed(0)
    return {name: load_base(name, None) for name in FAMILIES}


@pytest.mark.parametrize("name", FAMILIES)
def test_family_and_groups_partition_weights(bases, name):
    model = bases[name].model
    assert mask_groups.tower_family(model) == FAMILIES[name]
    table = mask_groups.group_tensors(model)
    named = [n for g in ("attn", "mlp", "conv") for n in table[g]]
    assert len(named) == len(set(named))  # a weight is in one group
    assert table["conv1"] == table["conv"][:1]
    params = dict(model.named_parameters())
    assert all(params[n].ndim >= 2 for n in named)
    assert not any(n.endswith(".bias") or "norm" in n or "pos_embed" in n for n in named)


def test_attn_names_per_family(bases):
    def attn(name):
        return [n.replace("visual.", "") for n in mask_groups.group_tensors(bases[name].model)["attn"]]

    assert attn("rmt-tiny-timm-vit") == [
        "trunk.blocks.0.attn.qkv.weight", "trunk.blocks.0.attn.proj.weight", "trunk.blocks.1.attn.qkv.weight",
        "trunk.blocks.1.attn.proj.weight", "trunk.attn_pool.q.weight", "trunk.attn_pool.kv.weight",
        "trunk.attn_pool.proj.weight"]
    assert attn("rmt-tiny-mobileclip2") == ["trunk.stages.3.blocks.0.token_mixer.qkv.weight",
                                            "trunk.stages.3.blocks.0.token_mixer.proj.weight"]
    assert attn("rmt-tiny-rn") == ["attnpool.k_proj.weight", "attnpool.q_proj.weight", "attnpool.v_proj.weight",
                                   "attnpool.c_proj.weight"]
    assert attn("rmt-tiny-convnext") == []


def test_mlp_and_conv_names(bases):
    convnext = mask_groups.group_tensors(bases["rmt-tiny-convnext"].model)
    assert "visual.trunk.stages.0.blocks.0.mlp.fc1.weight" in convnext["mlp"]
    assert "visual.trunk.stages.0.blocks.0.conv_dw.weight" in convnext["conv"]
    assert "visual.head.proj.weight" not in {n for g in convnext.values() for n in g}  # the final projection
    fastvit = mask_groups.group_tensors(bases["rmt-tiny-mobileclip2"].model)
    assert "visual.trunk.stages.0.blocks.0.mlp.fc1.weight" in fastvit["mlp"]  # 1x1 conv of ConvMlp
    assert "visual.trunk.stages.0.blocks.0.mlp.conv.conv.weight" in fastvit["conv"]  # its 7x7 depthwise
    rn = mask_groups.group_tensors(bases["rmt-tiny-rn"].model)
    assert "visual.layer1.0.conv1.weight" in rn["conv"] and rn["mlp"] == []


def test_unknown_group_is_one_line(bases):
    with pytest.raises(InputError, match=r"unknown mask group\(s\) \['ffn'\]: choose from attn, mlp, conv1, conv$"):
        maskable_tensors(bases["rmt-tiny-rn"].model, ("attn", "ffn"))


def test_group_the_tower_lacks_names_the_choices(bases):
    with pytest.raises(InputError) as info:
        maskable_tensors(bases["rmt-tiny-convnext"].model, ("attn",), "rmt-tiny-convnext")
    message = str(info.value)
    assert "\n" not in message
    assert "rmt-tiny-convnext" in message and "timm-convnext" in message
    assert message.endswith("has no weights in mask group attn: choose from mlp, conv1, conv")


def test_small_share_is_refused_with_the_groups_to_use(bases):
    model = bases["rmt-tiny-mobileclip2"].model
    assert mask_groups.share(model, maskable_tensors(model, ("attn",))) < mask_groups.MIN_SHARE
    with pytest.raises(InputError, match=r"cover 17% .* \(under 20%.*use --mask-groups attn,mlp \(\d+%\)$"):
        mask_groups.check_share(model, ("attn",), "rmt-tiny-mobileclip2")
    mask_groups.check_share(model, ("attn", "mlp"), "rmt-tiny-mobileclip2")
    for name in ("rmt-tiny-vit", "rmt-tiny-timm-vit", "rmt-tiny-rn"):
        mask_groups.check_share(bases[name].model, ("attn",), name)


def test_unsupported_tower_is_refused():
    from types import SimpleNamespace

    with pytest.raises(InputError, match="image tower str is not a supported family: choose a model whose"):
        mask_groups.tower_family(SimpleNamespace(visual="not a tower"))


def test_fastvit_is_reparameterised_and_fingerprints_fused_weights(bases, tmp_path):
    """load_base fuses RepMixer/MobileOne branches; a training-form checkpoint (as MobileCLIP2 ships) and
    a fused one (saved after load_base) give the same masked weights and fingerprint."""
    import open_clip
    import torch

    from rmt_deploy.basemodel.loading import save_checkpoint

    torch.manual_seed(3)
    raw = open_clip.create_model("rmt-tiny-mobileclip2").eval()
    assert any("conv_kxk" in n for n, _ in raw.named_parameters())
    train_form = tmp_path / "train_form.safetensors"
    save_checkpoint(raw, train_form)
    a = load_base("rmt-tiny-mobileclip2", str(train_form))
    assert not any("conv_kxk" in n or "conv_scale" in n for n, _ in a.model.named_parameters())
    fused = save_checkpoint(a.model, tmp_path / "fused.safetensors")
    b = load_base("rmt-tiny-mobileclip2", str(fused))
    groups = ("attn", "mlp", "conv")
    ta, tb = maskable_tensors(a.model, groups), maskable_tensors(b.model, groups)
    assert any("reparam_conv" in n for n in ta)
    assert fingerprint("rmt-tiny-mobileclip2", ta) == fingerprint("rmt-tiny-mobileclip2", tb)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference, fused_out = raw.visual(images), a.model.visual(images)
    assert np.linalg.norm(fused_out - reference) / np.linalg.norm(reference) < 1e-4


def test_preprocess_follows_the_family(bases):
    siglip = preprocess_config(bases["rmt-tiny-timm-vit"].model)
    assert (siglip["mean"], siglip["std"], siglip["resize_mode"]) == ([0.5] * 3, [0.5] * 3, "squash")
    mobileclip = preprocess_config(bases["rmt-tiny-mobileclip2"].model)
    assert (mobileclip["mean"], mobileclip["std"], mobileclip["interpolation"]) == ([0.0] * 3, [1.0] * 3, "bilinear")
    assert preprocess_config(bases["rmt-tiny-vit"].model)["resize_mode"] == "shortest"


def test_named_open_clip_models_take_the_preprocessing_their_tags_agree_on():
    from rmt_deploy.basemodel.loading import config_preprocess

    assert config_preprocess("ViT-B-16-SigLIP2-256")["resize_mode"] == "squash"
    assert tuple(config_preprocess("MobileCLIP2-S0")["std"]) == (1.0, 1.0, 1.0)
