"""`eval` on a class subset of the training classes (ImageNet-A/R, base/new halves) or on new classes (--text-head)."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rmt_deploy.errors import InputError  # noqa: E402
from rmt_deploy.training.datasets import FewShotData  # noqa: E402
from rmt_deploy.training.evaluation import class_head, task_head  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pack(make_taskpack):
    return make_taskpack("four", seed=3, classes=4)


def _data(names, parent=None, index=None):
    return FewShotData("d", names, "a photo of a {}.", [], [], [], parent, index)


def test_the_tasks_own_classes_use_its_head(pack, tiny_base):
    head = task_head(pack, _data(list(pack.class_names)), tiny_base, CPU)
    np.testing.assert_array_equal(head.numpy(), pack.head)


def test_a_subset_of_the_label_space_takes_those_rows(pack, tiny_base):
    adversarial = _data(["class 1", "class 3"], list(pack.class_names), [1, 3])
    np.testing.assert_array_equal(task_head(pack, adversarial, tiny_base, CPU).numpy(), pack.head[[1, 3]])
    by_name = _data(["class 2", "class 0"])
    np.testing.assert_array_equal(task_head(pack, by_name, tiny_base, CPU).numpy(), pack.head[[2, 0]])


def test_new_classes_need_the_text_head(pack, tiny_base):
    new = _data(["zebra", "class 0"])
    with pytest.raises(InputError, match="classes the task 'four' was not trained on .*'zebra'.*--text-head"):
        task_head(pack, new, tiny_base, CPU)
    head = task_head(pack, new, tiny_base, CPU, text_head=True)
    expected = class_head(tiny_base, ["zebra", "class 0"], pack.template, CPU)
    torch.testing.assert_close(head, expected)


def test_eval_scores_an_imagenet_task_on_imagenet_a(tiny_checkpoint, tmp_path, capsys):
    from rmt_deploy.cli import main

    from .test_data import _write_imagenet_family

    _write_imagenet_family(tmp_path / "data")
    main(["train", "--model", "rmt-tiny-vit", "--pretrained", str(tiny_checkpoint), "--dataset", "imagenet",
          "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--shots", "1", "--epochs", "1",
          "--batch-size", "4", "--workers", "0", "--device", "cpu", "--no-progress"])
    capsys.readouterr()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["hyperparameters"]["lr"] == 3e-5 and metrics["epochs"] == 1  # ImageNet's lr, --epochs given
    results = {}
    for dataset in ("imagenet", "imagenetv2", "imagenet-a"):
        main(["eval", "--task", str(tmp_path / "run" / "imagenet.rmtask"), "--dataset", dataset, "--data-root",
              str(tmp_path / "data"), "--pretrained", str(tiny_checkpoint), "--device", "cpu", "--workers", "0",
              "--json"])
        results[dataset] = json.loads(capsys.readouterr().out)
    assert results["imagenet"]["accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert results["imagenetv2"]["total"] == 4 and results["imagenet-a"]["total"] == 4
    assert results["imagenet-a"]["dataset"] == "imagenet_a"
