"""Each task head on the demo's real images: trains, exports (shared, folded), serves what the trainer measured."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("skimage")
pytest.importorskip("sklearn")

from rmt_deploy.cli import main  # noqa: E402
from rmt_deploy.demo.datasets import build_digits, build_textures  # noqa: E402

HEADS = ("zeroshot", "coop", "tip-adapter")
SHOTS, TEST_PER_CLASS, EPOCHS = 16, 10, 6


def _train(task, checkpoint, out, head):
    from rmt_deploy.training.trainer import TrainConfig, train_task

    config = TrainConfig(model="rmt-tiny-vit", dataset="imagefolder", data_root=str(task.root), out=str(out),
                         pretrained=str(checkpoint), task=f"{task.name}-{head}", template=task.template, shots=SHOTS,
                         seed=1, epochs=EPOCHS, batch_size=16, lr=1e-3, device="cpu", workers=0, progress=False,
                         head=head, tip_views=4)
    return train_task(config)


@pytest.fixture(scope="module")
def trained(tiny_checkpoint, make_bundle, tmp_path_factory):
    """Both demo tasks with every head, exported into one bundle (shared and folded)."""
    root = tmp_path_factory.mktemp("heads")
    tasks = [build_textures(root / "textures", SHOTS, TEST_PER_CLASS),
             build_digits(root / "digits", SHOTS, TEST_PER_CLASS)]
    results = {(t.name, h): _train(t, tiny_checkpoint, root / "runs" / f"{t.name}-{h}", h)
               for t in tasks for h in HEADS}
    bundle = make_bundle([r.taskpack for r in results.values()], mode="both")
    return {"tasks": {t.name: t for t in tasks}, "results": results, "report": make_bundle.report(bundle),
            "bundle": bundle}


def _test_images(task):
    paths, truth = [], []
    for name in task.class_names:
        files = sorted((task.root / "test" / name).glob("*.png"))
        paths += files
        truth += [name] * len(files)
    return paths, np.asarray(truth)


def test_export_matches_the_trainer_for_every_head(trained):
    checks = trained["report"].checks
    first = checks[0].task  # the constant graph is task-independent: the export checks it with the first task
    assert {(c.task, c.kind) for c in checks} == {(f"{t}-{h}", k) for t in ("textures", "digits") for h in HEADS
                                                  for k in ("shared", "folded")} | {(first, "constant")}
    assert all(c.ok and c.rel_l2 <= 1e-5 for c in checks), [c.line() for c in checks]


@pytest.mark.parametrize("task_name", ["textures", "digits"])
@pytest.mark.parametrize("head", HEADS)
def test_served_accuracy_equals_the_trainers(trained, task_name, head):
    from rmt_deploy.artifacts.bundle import Bundle
    from rmt_deploy.bench.sessions import folded_session
    from rmt_deploy.runtime.engine import Engine
    from rmt_deploy.runtime.preprocess import ImageTransform, to_batch

    task, metrics = trained["tasks"][task_name], trained["results"][(task_name, head)].metrics
    paths, truth = _test_images(task)
    name = f"{task_name}-{head}"
    with Engine.load(trained["bundle"], task=name) as engine:
        shared = engine.predict(paths)
    bundle = Bundle.open(trained["bundle"])
    batch = to_batch(paths, ImageTransform.from_config(bundle.manifest.preprocess))
    folded = folded_session(bundle, name).run(None, {"image": batch})[0]
    assert metrics["head"] == head and metrics["test_images"] == len(paths)
    # served logits are the same function of the same images: one near-tie flip at most
    folded_labels = np.asarray(shared.class_names)[folded.argmax(1)]
    for served in (np.mean(np.asarray(shared.labels) == truth), np.mean(folded_labels == truth)):
        assert abs(served - metrics["test_accuracy"]) <= 1.01 / len(paths)
    np.testing.assert_allclose(folded, shared.logits, rtol=1e-4, atol=1e-3)


def test_tip_adapter_keeps_the_mask_only_accuracy_on_held_out_textures(trained):
    tip = trained["results"][("textures", "tip-adapter")].metrics
    zeroshot = trained["results"][("textures", "zeroshot")].metrics
    assert tip["mask_only_test_accuracy"] == zeroshot["test_accuracy"]  # same masks: the cache is added after training
    assert tip["test_accuracy"] >= tip["mask_only_test_accuracy"] - 0.02
    assert 0 <= tip["tip_alpha"] <= 100 and 0 < tip["tip_beta"] <= 100
    assert tip["tip_cache_keys"] == 3 * SHOTS


def test_coop_head_is_the_learned_prompts(trained):
    from rmt_deploy.artifacts.task_file import TaskPack

    coop = TaskPack.load(trained["results"][("textures", "coop")].taskpack)
    zeroshot = TaskPack.load(trained["results"][("textures", "zeroshot")].taskpack)
    assert coop.head_kind == "coop" and coop.cache is None and coop.head.shape == zeroshot.head.shape
    assert not np.allclose(coop.head, zeroshot.head)
    np.testing.assert_allclose(np.linalg.norm(coop.head, axis=1), 1.0, rtol=1e-5)


def test_inspect_shows_the_head_and_its_bytes(trained, capsys):
    path = trained["results"][("textures", "tip-adapter")].taskpack
    main(["inspect", str(path)])
    out = capsys.readouterr().out
    assert "head         tip-adapter: text 3x32 float32 (384 bytes) + cache 48 keys float16" in out
    main(["inspect", str(path), "--json"])
    head = json.loads(capsys.readouterr().out)["head"]
    assert head["bytes"] == 384 + 48 * (32 * 2 + 8) and head["kind"] == "tip-adapter"


def test_train_refuses_an_unknown_head_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--model", "rmt-tiny-vit", "--dataset", "imagefolder", "--data-root", str(tmp_path),
              "--out", str(tmp_path / "o"), "--head", "tip"])
    err = capsys.readouterr().err
    assert info.value.code == 1 and "Traceback" not in err
    assert err.strip().endswith("head 'tip' is not one of zeroshot, coop, tip-adapter, tip-adapter-f: choose one "
                                "with --head") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("task_name", ["textures", "digits"])
def test_eval_scores_a_tip_adapter_task_as_the_trainer_did(trained, tiny_checkpoint, task_name):
    from rmt_deploy.training.evaluation import EvalConfig, evaluate_taskpack

    result, task = trained["results"][(task_name, "tip-adapter")], trained["tasks"][task_name]
    scored = evaluate_taskpack(EvalConfig(result.taskpack, "imagefolder", task.root, str(tiny_checkpoint),
                                          device="cpu", workers=0))
    assert scored.accuracy == result.metrics["test_accuracy"]
    baseline = evaluate_taskpack(EvalConfig(result.taskpack, "imagefolder", task.root, str(tiny_checkpoint),
                                            device="cpu", workers=0, zero_shot=True))
    assert baseline.accuracy == result.metrics["zero_shot_test_accuracy"]


def test_tip_adapter_f_fine_tunes_the_keys(trained, tiny_checkpoint, tmp_path):
    from rmt_deploy.artifacts.task_file import TaskPack

    task = trained["tasks"]["textures"]
    tuned = TaskPack.load(_train(task, tiny_checkpoint, tmp_path, "tip-adapter-f").taskpack)
    plain = TaskPack.load(trained["results"][("textures", "tip-adapter")].taskpack)
    assert tuned.head_kind == "tip-adapter-f" and tuned.cache.keys.shape == plain.cache.keys.shape
    np.testing.assert_array_equal(tuned.cache.labels, plain.cache.labels)
    assert not np.array_equal(tuned.cache.keys, plain.cache.keys)  # same masks and views; the keys moved
