"""Base-model loading through the user's checkpoint path, mask groups, fingerprints."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from rmt_deploy.basemodel.loading import (  # noqa: E402
    fingerprint,
    load_base,
    maskable_tensors,
    preprocess_config,
    save_checkpoint,
)
from rmt_deploy.errors import InputError, MissingDependencyError  # noqa: E402

TINY_MODEL = "rmt-tiny-vit"


def test_tiny_base_loads_from_local_checkpoint(tiny_checkpoint, tiny_base):
    from safetensors.torch import load_file

    saved = load_file(str(tiny_checkpoint))
    for name, value in tiny_base.model.state_dict().items():
        assert torch.equal(saved[name], value), name


@pytest.mark.parametrize("wrap", ["plain", "training_checkpoint"])
def test_pt_checkpoints_load(tmp_path, tiny_base, wrap):
    state = {k: v.clone() for k, v in tiny_base.model.state_dict().items()}
    if wrap == "training_checkpoint":  # open_clip's own training checkpoints: DDP-prefixed state_dict
        state = {"epoch": 3, "state_dict": {"module." + k: v for k, v in state.items()}}
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    loaded = load_base(TINY_MODEL, str(path))
    a = maskable_tensors(tiny_base.model)
    b = maskable_tensors(loaded.model)
    assert fingerprint(TINY_MODEL, a) == fingerprint(TINY_MODEL, b)


def test_attn_group_selects_every_visual_block():
    base = load_base(TINY_MODEL, None)
    names = list(maskable_tensors(base.model))
    assert names == [
        "visual.transformer.resblocks.0.attn.in_proj_weight",
        "visual.transformer.resblocks.0.attn.out_proj.weight",
        "visual.transformer.resblocks.1.attn.in_proj_weight",
        "visual.transformer.resblocks.1.attn.out_proj.weight",
    ]


def test_optional_groups(tiny_base):
    names = set(maskable_tensors(tiny_base.model, groups=("mlp", "conv1")))
    assert "visual.conv1.weight" in names
    assert "visual.transformer.resblocks.1.mlp.c_proj.weight" in names
    assert all(n.startswith("visual.") and "attn" not in n for n in names)


def test_fingerprint_changes_with_any_value_and_with_model_name(tiny_base):
    tensors = {n: t.detach().clone() for n, t in maskable_tensors(tiny_base.model).items()}
    reference = fingerprint(TINY_MODEL, tensors)
    assert fingerprint(TINY_MODEL, tensors) == reference
    assert fingerprint("other", tensors) != reference
    first = next(iter(tensors))
    tensors[first][0, 0] += 1e-3
    assert fingerprint(TINY_MODEL, tensors) != reference


def test_preprocess_config_matches_model(tiny_base):
    cfg = preprocess_config(tiny_base.model)
    assert cfg["image_size"] == [32, 32]
    assert cfg["interpolation"] == "bicubic" and len(cfg["mean"]) == 3


def test_save_checkpoint_round_trips_pt(tmp_path, tiny_base):
    path = save_checkpoint(tiny_base.model, tmp_path / "tiny.pt")
    loaded = load_base(TINY_MODEL, str(path))
    assert fingerprint(TINY_MODEL, maskable_tensors(loaded.model)) == fingerprint(
        TINY_MODEL, maskable_tensors(tiny_base.model))


@pytest.mark.parametrize(
    "model, pretrained, message",
    [
        ("no-such-model", None, "unknown to open_clip"),
        (TINY_MODEL, "/nowhere/weights.pt", "does not exist"),
        (TINY_MODEL, "laion-made-up-tag", "neither a checkpoint file nor a tag"),
    ],
)
def test_bad_base_arguments(model, pretrained, message):
    with pytest.raises(InputError, match=message):
        load_base(model, pretrained)


def test_checkpoint_of_another_architecture_is_refused(tmp_path, tiny_checkpoint):
    with pytest.raises(InputError, match="cannot load rmt-small-vit"):
        load_base("rmt-small-vit", str(tiny_checkpoint))


def test_unknown_mask_group(tiny_base):
    with pytest.raises(InputError, match="choose from attn, mlp, conv1"):
        maskable_tensors(tiny_base.model, groups=("attn", "everything"))


@pytest.mark.parametrize("name, content", [
    ("garbage.pt", b"this is not a checkpoint"),
    ("truncated.safetensors", None),
])
def test_damaged_checkpoint_files_are_input_errors(tmp_path, tiny_checkpoint, name, content):
    path = tmp_path / name
    path.write_bytes(content if content is not None else tiny_checkpoint.read_bytes()[:5000])
    with pytest.raises(InputError, match=f"cannot load {TINY_MODEL} weights from .*{name}"):
        load_base(TINY_MODEL, str(path))


def test_a_tokenizer_that_cannot_be_made_fails_only_where_text_is_needed(monkeypatch):
    """SigLIP's tokenizer needs transformers and Hugging Face files: loading a base for masking, export or
    benchmarks must not need it; asking for the tokenizer then is one line naming the fix."""
    open_clip = pytest.importorskip("open_clip")

    def no_transformers(name):
        raise ModuleNotFoundError("No module named 'transformers'")

    monkeypatch.setattr(open_clip, "get_tokenizer", no_transformers)
    base = load_base("rmt-tiny-vit", None)
    assert base.model.visual is not None
    with pytest.raises(MissingDependencyError, match=r"rmt-tiny-vit's tokenizer cannot be made \(ModuleNotFoundError"
                                                     r".*pip install transformers") as info:
        base.tokenizer
    assert "\n" not in str(info.value)
