"""Every tower family end to end: trained through the CLI, exported shared + folded, served by the Engine.

Per family (tiny configs in rmt_deploy/basemodel/model_configs): the Engine equals the folded model
and the masked torch model, switching A -> B -> A is exact, and a task of one family is refused by a
bundle of another (fingerprint).
"""
from __future__ import annotations

import numpy as np
import pytest
import rmt_test_families as families  # tests/families.py (loaded by tests/conftest.py): Family, FAMILIES

pytest.importorskip("timm")
pytest.importorskip("onnxruntime")

from rmt_deploy.errors import IncompatibleBaseError  # noqa: E402
from rmt_deploy.runtime.backends.constant_sessions import ASK_AFTER_USES  # noqa: E402
from rmt_deploy.runtime.engine import Engine  # noqa: E402

FAMILIES = families.FAMILIES  # model -> the mask groups its tasks train (None: the default, attn)
_train = families.train_args


def rel_l2(test: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(test, np.float64) - reference) / np.linalg.norm(reference))


@pytest.mark.parametrize("model", FAMILIES)
def test_export_verifies_against_torch(family, model):
    fam = family(model)
    assert {c.kind for c in fam.report.checks} == {"shared", "constant", "folded"}
    assert all(c.ok and c.rel_l2 <= 1e-5 for c in fam.report.checks), [c.line() for c in fam.report.checks]


@pytest.mark.parametrize("model", FAMILIES)
@pytest.mark.parametrize("constant", [True, False], ids=["constant-sessions", "fed"])
def test_engine_equals_folded_and_masked_torch_and_switches_exactly(family, model, constant):
    """With one buffer, A -> B -> A rewrites it twice; A's answers come back bit for bit, through its constant
    session (made anew over the rewritten buffer) or through the fed graph."""
    import onnxruntime as ort

    fam = family(model)
    images = fam.images()
    with Engine.load(fam.bundle, cache_tasks=1, threads=1, constant_sessions=constant) as engine:
        first = {}
        for task in ("a", "b", "a"):
            engine.switch(task)
            for _ in range(ASK_AFTER_USES):  # the runs after which the task's session is asked for
                engine.predict(images)
            assert engine.wait_ready(60)
            assert engine.session_stats["ready"] == int(constant)
            got = engine.predict(images).logits
            folded = ort.InferenceSession(str(engine.bundle.folded_path(task)), providers=["CPUExecutionProvider"])
            assert rel_l2(got, folded.run(None, {"image": images})[0]) <= 1e-5
            assert rel_l2(got, fam.masked_logits(task, images)) <= 1e-5
            if task in first:
                np.testing.assert_array_equal(got, first[task])  # A -> B -> A restores A exactly
            first[task] = got
        assert not np.allclose(first["a"], first["b"])
        assert engine.session_stats["made"] == 3 * int(constant)
        assert all(0 < fam.packs[t].sparsity < 1 for t in fam.packs), [fam.packs[t].sparsity for t in fam.packs]


@pytest.mark.parametrize("model", FAMILIES)
def test_engine_preprocesses_files_as_open_clip_does(family, model):
    fam = family(model)
    with Engine.load(fam.bundle, task="a", threads=1) as engine:
        from_files = engine.predict([str(p) for p in fam.paths()[:3]]).logits
        from_batch = engine.predict(fam.images()).logits
    assert rel_l2(from_files, from_batch) <= 1e-5


def test_preprocessing_is_recorded_per_family(family):
    from rmt_deploy.artifacts.bundle import Bundle

    siglip = Bundle.open(family("rmt-tiny-timm-vit").bundle).manifest.preprocess
    assert (siglip.mean, siglip.resize_mode) == ([0.5] * 3, "squash")
    mobileclip = Bundle.open(family("rmt-tiny-mobileclip2").bundle).manifest.preprocess
    assert (mobileclip.std, mobileclip.interpolation, mobileclip.image_size) == ([1.0] * 3, "bilinear", [64, 64])


def test_task_of_another_family_is_refused(family):
    vit, convnext = family("rmt-tiny-timm-vit"), family("rmt-tiny-convnext")
    with Engine.load(vit.bundle, threads=1) as engine:
        with pytest.raises(IncompatibleBaseError, match="'a' was trained on base"):
            engine.add_task(convnext.packs["a"])


def test_task_records_its_mask_groups(family):
    pack = family("rmt-tiny-convnext").packs["a"]
    assert pack.hyperparameters["mask_groups"] == ["mlp", "conv"]
    assert any(".conv_dw." in n for n in pack.masks) and any(".mlp.fc1." in n for n in pack.masks)


@pytest.mark.parametrize("model, pattern", [
    ("rmt-tiny-convnext", r"error: rmt-tiny-convnext's image tower \(timm-convnext\) has no weights in mask group "
                          r"attn: choose from mlp, conv1, conv\n$"),
    ("rmt-tiny-mobileclip2", r"error: mask group\(s\) attn cover 17% .*use --mask-groups attn,mlp \(\d+%\)\n$"),
])
def test_default_groups_that_barely_mask_the_tower_are_refused_in_one_line(family, folder_root, tmp_path, capsys,
                                                                            model, pattern):
    from rmt_deploy.cli import main

    fam = family(model)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(_train(fam.checkpoint, model, folder_root, tmp_path / "out", "t", 1, None))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and __import__("re").search(pattern, err), err
    assert not list((tmp_path / "out").glob("*.rmtask"))


def test_checkpoint_of_another_family_is_one_line(family, folder_root, tmp_path, capsys):
    from rmt_deploy.cli import main

    checkpoint = family("rmt-tiny-rn").checkpoint
    with pytest.raises(SystemExit):
        main(_train(checkpoint, "rmt-tiny-convnext", folder_root, tmp_path / "out", "t", 1, "mlp"))
    err = capsys.readouterr().err
    assert err.startswith("error: cannot load rmt-tiny-convnext weights from") and err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize("model", FAMILIES)
def test_fp16_export_verifies(family, model, tmp_path):
    from rmt_deploy.export import ExportConfig, export_bundle

    fam = family(model)
    paths = [p for t in fam.packs for p in fam.bundle.parent.glob(f"{t}/{t}.rmtask")]
    report = export_bundle(ExportConfig(model, str(fam.checkpoint), paths, tmp_path / "fp16", mode="both",
                                        fp16=True), progress=False)
    assert report.checks and all(c.ok for c in report.checks)
    with Engine.load(tmp_path / "fp16", task="a", threads=1) as engine:
        assert rel_l2(engine.predict(fam.images()).logits, fam.masked_logits("a", fam.images())) <= 2e-2


def test_masks_learn_real_textures_on_a_convnext(tmp_path):
    """scikit-image's brick / grass / gravel crops (held-out test region): masks over ConvNeXt's MLP and conv
    weights beat the zero-shot head of the same random tower."""
    pytest.importorskip("skimage")
    import json

    import torch

    from rmt_deploy.basemodel.loading import load_base, save_checkpoint
    from rmt_deploy.cli import main
    from rmt_deploy.demo.datasets import build_textures

    task = build_textures(tmp_path / "data", shots=16, test_per_class=20, seed=0)
    torch.manual_seed(0)
    model = load_base("rmt-tiny-convnext", None).model
    with torch.no_grad():
        for name, param in model.visual.named_parameters():
            if "gamma" in name:
                param.fill_(0.5)
    checkpoint = save_checkpoint(model, tmp_path / "convnext.safetensors")
    main(["train", "--model", "rmt-tiny-convnext", "--pretrained", str(checkpoint), "--dataset", "imagefolder",
          "--data-root", str(task.root), "--out", str(tmp_path / "run"), "--task", "textures",
          "--template", task.template, "--shots", "16", "--epochs", "6", "--batch-size", "16", "--lr", "1e-3",
          "--workers", "0", "--device", "cpu", "--no-progress", "--mask-groups", "mlp,conv"])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test_images"] == 60
    assert metrics["test_accuracy"] >= metrics["zero_shot_test_accuracy"] + 0.2, metrics
