"""Training inputs are validated before any work: numeric options have ranges (shown in --help),
templates are checked when parsed, class names that collide after cleaning and classes without
training images are errors naming them."""
from __future__ import annotations

import math
import warnings

import click
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from rmt_deploy.cli import cli
from rmt_deploy.errors import InputError
from rmt_deploy.training.data import build_dataset
from rmt_deploy.training.datasets import FewShotData


def _invoke(*args: str, tmp_path):
    """`rmt-deploy train` on a data root that does not exist: a check that passes reaches the data error."""
    base = ["train", "--model", "rmt-tiny-vit", "--dataset", "imagefolder", "--data-root",
            str(tmp_path / "no-such-data"), "--out", str(tmp_path / "out")]
    return CliRunner().invoke(cli, [*base, *args])


@pytest.mark.parametrize("option, value, message", [
    ("--eval-batch-size", "0", "0 is not in the range 1<=x<=1048576"),  # old: torch traceback after training
    ("--lr", "inf", "inf is not in the range 0<x<=10"),                 # old: accepted, masks 51% zeros
    ("--shots", "-3", "-3 is not in the range x>=0"),                    # old: accepted
    ("--seed", "-1", "is not in the range 0<=x"),
    ("--batch-size", "0", "0 is not in the range 1<=x"),
    ("--epochs", "0", "0 is not in the range 1<=x"),
    ("--adam-beta1", "1", "1.0 is not in the range 0<=x<1"),
    ("--gdr-lambda", "1.5", "1.5 is not in the range 0<=x<=1"),
    ("--temperature", "0", "0.0 is not in the range 0<x"),
    ("--workers", "-1", "-1 is not in the range 0<=x<=256"),
    ("--coop-lr", "-0.1", "is not in the range 0<x<=10"),
    ("--tip-views", "0", "0 is not in the range 1<=x"),
    ("--keep-checkpoints", "-2", "-2 is not in the range x>=0"),
])
def test_out_of_range_numeric_options_fail_before_any_work(tmp_path, option, value, message):
    result = _invoke(option, value, tmp_path=tmp_path)
    assert result.exit_code == 2, result.output
    assert message in result.output and option in result.output
    assert not (tmp_path / "out").exists()


def test_a_nan_option_is_refused_before_any_work(tmp_path):
    result = _invoke("--lr", "nan", tmp_path=tmp_path)
    assert isinstance(result.exception, InputError) and "--lr nan: must be a finite number" in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_an_in_range_option_reaches_the_data_check(tmp_path):
    result = _invoke("--eval-batch-size", "1", "--shots", "0", tmp_path=tmp_path)
    assert isinstance(result.exception, InputError) and "data root" in str(result.exception)


@pytest.mark.parametrize("command", ["train", "eval"])
def test_every_numeric_option_has_a_range_shown_in_help(command):
    group_command = cli.get_command(click.Context(cli), command)
    numeric = [p for p in group_command.params
               if isinstance(p.type, (click.types.IntParamType, click.types.FloatParamType))]
    assert numeric
    unbounded = [p.name for p in numeric if not isinstance(p.type, (click.IntRange, click.FloatRange))]
    assert unbounded == [], f"{command}: options without a range: {unbounded}"
    text = CliRunner().invoke(cli, [command, "--help"], terminal_width=200).output
    for p in numeric:
        described = p.type._describe_range()
        assert described in text, (p.name, described)


@pytest.mark.parametrize("template, found", [
    ("{}-{}", "{}, {}"),           # old: IndexError
    ("a photo of {0}", "{0}"),
    ("a photo of {name}", "{name}"),
    ("a photo of {:>10}", "{:>10}"),
    ("no class here", "none"),
])
def test_a_template_needs_exactly_one_plain_field(tmp_path, template, found):
    from rmt_deploy.training.datasets import check_template

    with pytest.raises(InputError, match=r"needs exactly one '\{\}' for the class name") as info:
        check_template(template)
    assert f"(found: {found})" in str(info.value)
    result = _invoke("--template", template, tmp_path=tmp_path)  # at parse time: before the data root check
    assert isinstance(result.exception, InputError) and "needs exactly one" in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_good_templates_pass_and_unbalanced_braces_are_one_error():
    from rmt_deploy.training.datasets import check_template

    assert check_template("a photo of a {}.") == "a photo of a {}."
    assert check_template("{{literal}} {} texture") == "{{literal}} {} texture"
    with pytest.raises(InputError, match="is not a format string"):
        check_template("a {} photo {")


def test_train_config_checks_the_same_before_any_work(tmp_path):
    from rmt_deploy.training.config import TrainConfig

    base = dict(model="rmt-tiny-vit", dataset="dtd", data_root=str(tmp_path), out=str(tmp_path / "out"))
    for bad, message in [({"lr": math.inf}, "--lr inf: must be a finite number"),
                         ({"lr": math.nan}, "--lr nan"),
                         ({"shots": -3}, "--shots -3"),
                         ({"eval_batch_size": 0}, "--eval-batch-size 0"),
                         ({"adam_beta2": 1.0}, "betas lie in [0, 1)"),
                         ({"template": "{}-{}"}, "needs exactly one"),
                         ({"score_l2": math.inf}, "--score-l2 inf")]:
        with pytest.raises(InputError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            TrainConfig(**base, **bad).validate()
    assert TrainConfig(**base, shots=0).validate().shots == 0


def test_class_head_refuses_a_bad_template_as_one_error(tiny_base):
    import torch

    from rmt_deploy.training.evaluation import class_head

    with pytest.raises(InputError, match="needs exactly one"):
        class_head(tiny_base, ["cat", "dog"], "{}-{}", torch.device("cpu"))


def _folder(path, count: int) -> None:
    path.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(path / f"{i}.png")


def test_class_folders_that_collide_after_cleaning_name_both(tmp_path):
    """Old code: folders Dog and dog became two classes both named 'dog'."""
    root = tmp_path / "pets"
    for name in ("Dog", "cat", "dog"):
        _folder(root / name, 3)
    with pytest.raises(InputError) as info:
        build_dataset("imagefolder", root, shots=0, seed=1)
    message = str(info.value)
    assert str(root / "Dog") in message and str(root / "dog") in message and "both become class 'dog'" in message
    shutil_root = tmp_path / "split"
    for part in ("train", "test"):
        for name in ("big_cat", "Big Cat"):
            _folder(shutil_root / part / name, 2)
    with pytest.raises(InputError, match="both become class 'big cat'"):
        build_dataset("imagefolder", shutil_root, shots=0, seed=1)


def test_a_class_without_training_images_is_an_error_naming_it(tmp_path):
    """Old code: trained without a word (the class had a text head and no image)."""
    root = tmp_path / "pets"
    _folder(root / "train" / "cat", 3)
    _folder(root / "train" / "dog", 0)
    _folder(root / "test" / "cat", 2)
    _folder(root / "test" / "dog", 2)
    with pytest.raises(InputError, match=r"class folder '.*train/dog' has no images .*every class needs training"):
        build_dataset("imagefolder", root, shots=0, seed=1)


def test_the_trainer_refuses_a_split_whose_class_has_no_training_images(tmp_path):
    from rmt_deploy.training.data import check_training_classes

    path = tmp_path / "x.png"
    data = FewShotData("dtd", ["banded", "woven"], "{} texture.", [(path, 0)], [], [(path, 1)])
    with pytest.raises(InputError, match=r"1 class\(es\) of dtd have no training images, e.g. 'woven' \(label 1\)"):
        check_training_classes(data)
    data.train.append((path, 1))
    check_training_classes(data)


def test_repeated_names_in_a_coop_list_are_a_warning_not_an_error():
    """A published class list may repeat a name (ImageNet's WordNet names: two 'crane's, two 'maillot's)."""
    from rmt_deploy.training.data import _warn_repeated_names

    data = FewShotData("imagenet", ["crane", "goose", "crane"], "a photo of a {}.", [], [], [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _warn_repeated_names(data)
    assert [str(w.message) for w in caught] == [
        "imagenet: labels 0 and 2 share the class name 'crane'; their prompts are the same (as the dataset's class list says)"]
