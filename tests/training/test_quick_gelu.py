"""The activation follows the weights: QuickGELU for OpenAI's (tag or local file), recorded through export and runtime."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from rmt_deploy.basemodel.loading import (  # noqa: E402
    config_quick_gelu,
    load_base,
    save_checkpoint,
    tag_quick_gelu,
    uses_quick_gelu,
)
from rmt_deploy.errors import IncompatibleBaseError  # noqa: E402

TINY_MODEL = "rmt-tiny-vit"
OPENAI_EXTRAS = {"input_resolution": torch.tensor(32), "context_length": torch.tensor(77),
                 "vocab_size": torch.tensor(49408)}


def _openai_state(tiny_base) -> dict:
    """The tiny base's weights as OpenAI ships CLIP: fp16, plus its three metadata entries."""
    state = {k: v.detach().clone().half() if v.is_floating_point() else v.clone()
             for k, v in tiny_base.model.state_dict().items()}
    return {**state, **OPENAI_EXTRAS}


def _write_torchscript(state: dict, path) -> None:
    """A TorchScript archive whose state_dict is `state` (the container OpenAI's released .pt files use)."""
    root = torch.nn.Module()
    for name, value in state.items():
        *parents, leaf = name.split(".")
        module = root
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_buffer(leaf, value)
    with pytest.warns(FutureWarning):
        torch.jit.save(torch.jit.script(root), str(path))


def _assert_weights_equal(model, state: dict) -> None:
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name].float()), name


def test_registry_says_openai_weights_need_quick_gelu():
    assert tag_quick_gelu("ViT-B-16", "openai") is True
    assert tag_quick_gelu("ViT-B-16", "laion2b_s34b_b88k") is False
    assert config_quick_gelu("ViT-B-16-quickgelu") is True and config_quick_gelu("ViT-B-16") is False


def test_random_and_plain_checkpoints_build_gelu(tiny_base):
    assert tiny_base.quick_gelu is False and not uses_quick_gelu(tiny_base.model)
    assert any(isinstance(m, torch.nn.GELU) for m in tiny_base.model.modules())


@pytest.fixture
def openai_tag(monkeypatch, tiny_base, tmp_path):
    """`--pretrained openai` for the tiny model: open_clip's registry and download pointed at a local JIT file."""
    state = _openai_state(tiny_base)
    path = tmp_path / "ViT-tiny.pt"
    _write_torchscript(state, path)
    cfg = {"url": "https://example.invalid/ViT-tiny.pt", "quick_gelu": True,
           "mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY_MODEL, {"openai": cfg})
    downloads = []
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained",
                        lambda c, **kw: downloads.append(c) or str(path))
    return state, downloads


def test_openai_tag_builds_quick_gelu_with_the_downloaded_weights(openai_tag):
    state, downloads = openai_tag
    base = load_base(TINY_MODEL, "openai")
    assert base.quick_gelu is True and uses_quick_gelu(base.model)
    assert not any(isinstance(m, torch.nn.GELU) for m in base.model.modules())
    assert downloads and downloads[0]["quick_gelu"] is True
    _assert_weights_equal(base.model, state)


@pytest.mark.parametrize("layout", ["torchscript", "state_dict", "wrapped_state_dict"])
def test_openai_format_files_are_recognised(tmp_path, tiny_base, layout):
    state = _openai_state(tiny_base)
    path = tmp_path / "clip.pt"
    if layout == "torchscript":
        _write_torchscript(state, path)
    else:
        torch.save(state if layout == "state_dict" else {"state_dict": {"module." + k: v for k, v in state.items()}},
                   path)
    base = load_base(TINY_MODEL, str(path))
    assert base.quick_gelu is True and uses_quick_gelu(base.model)
    _assert_weights_equal(base.model, state)


def test_forcing_the_activation_overrides_the_weights(tmp_path, tiny_base):
    path = tmp_path / "clip.pt"
    torch.save(_openai_state(tiny_base), path)
    assert not uses_quick_gelu(load_base(TINY_MODEL, str(path), quick_gelu=False).model)
    assert uses_quick_gelu(load_base(TINY_MODEL, None, quick_gelu=True).model)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_saved_checkpoints_record_their_activation(tmp_path, suffix):
    torch.manual_seed(0)
    quick = load_base(TINY_MODEL, None, quick_gelu=True)
    path = save_checkpoint(quick.model, tmp_path / f"quick{suffix}")
    again = load_base(TINY_MODEL, str(path))
    assert again.quick_gelu is True and uses_quick_gelu(again.model)


@pytest.fixture
def quick_gelu_run(openai_tag, coop_root, tmp_path):
    """A 1-epoch CLI training run on `--pretrained openai` (the monkeypatched local download)."""
    from rmt_deploy.cli import main

    out = tmp_path / "run"
    main(["train", "--model", TINY_MODEL, "--pretrained", "openai", "--dataset", "dtd", "--data-root", str(coop_root),
          "--out", str(out), "--shots", "2", "--epochs", "1", "--batch-size", "4", "--lr", "2e-3", "--workers", "0",
          "--device", "cpu", "--no-progress"])
    return out


def test_quick_gelu_is_recorded_exported_and_rebuilt(quick_gelu_run, tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from rmt_deploy.artifacts.bundle import Bundle
    from rmt_deploy.artifacts.task_file import TaskPack
    from rmt_deploy.export import ExportConfig, export_bundle
    from rmt_deploy.runtime.backends.torch import TorchBackend

    pack_path = quick_gelu_run / "dtd.rmtask"
    assert TaskPack.load(pack_path).quick_gelu is True
    report = export_bundle(ExportConfig(TINY_MODEL, "openai", [pack_path], tmp_path / "bundle", mode="both"),
                           progress=False)
    assert report.checks and all(c.ok for c in report.checks)
    assert max(c.rel_l2 for c in report.checks) <= 1e-5
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["quick_gelu"] is True
    ops = {node.op_type for node in onnx.load(str(tmp_path / "bundle" / "base.onnx")).graph.node}
    assert "Sigmoid" in ops and not ops & {"Erf", "Gelu"}  # x * sigmoid(1.702 x), not erf-GELU
    backend = TorchBackend(Bundle.open(tmp_path / "bundle"), "cpu", None)
    assert uses_quick_gelu(backend.model)


def test_export_refuses_a_pack_trained_with_the_other_activation(quick_gelu_run, tmp_path):
    from rmt_deploy.export import ExportConfig, export_bundle

    gelu = load_base(TINY_MODEL, "openai", quick_gelu=False)  # the same weights, built with GELU
    assert not uses_quick_gelu(gelu.model)
    path = save_checkpoint(gelu.model, tmp_path / "gelu.safetensors")
    with pytest.raises(IncompatibleBaseError, match="quick_gelu=True, the base loads with quick_gelu=False"):
        export_bundle(ExportConfig(TINY_MODEL, str(path), [quick_gelu_run / "dtd.rmtask"], tmp_path / "b"),
                      progress=False)
