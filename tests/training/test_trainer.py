"""The trainer: config, one R-AMT step against a by-hand computation, and the CLI end to end."""
from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rmt_deploy.artifacts.task_file import TaskPack  # noqa: E402
from rmt_deploy.basemodel.loading import fingerprint, load_base, maskable_tensors  # noqa: E402
from rmt_deploy.cli import main  # noqa: E402
from rmt_deploy.errors import InputError  # noqa: E402
from rmt_deploy.training.distributed import DistContext  # noqa: E402
from rmt_deploy.training.masking import MaskedCLIP  # noqa: E402
from rmt_deploy.training.regularizer import gradient_dropout, score_penalty, teacher_loss  # noqa: E402
from rmt_deploy.training.trainer import TrainConfig, rmt_step  # noqa: E402

from .conftest import train_args  # noqa: E402

TINY = "rmt-tiny-vit"


def _cli(args, capsys):
    """Run `rmt-deploy ARGS`; return (exit code, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_config_round_trips_through_json():
    cfg = TrainConfig(model="m", dataset="dtd", data_root="/d", out="/o", pretrained="p.pt", task="t", shots=2,
                      seed=3, epochs=4, batch_size=5, lr=1e-3, adam_beta1=0.8, adam_beta2=0.99, weight_decay=0.1,
                      score_l2=2e-4, score_init=2e-2, threshold=1e-3, gdr=False, gdr_lambda=0.3, temperature=2.0,
                      mask_groups=("attn", "mlp"), subsample="base", device="cpu", precision="bf16", workers=0, eval_batch_size=7,
                      keep_checkpoints=2, resume=True, progress=False)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert TrainConfig.from_dict(TrainConfig("m", "d", "r", "o").to_dict()) == TrainConfig("m", "d", "r", "o")


def test_reference_defaults():
    cfg = TrainConfig("m", "dtd", "r", "o", shots=8).validate()
    assert (cfg.lr, cfg.adam_beta1, cfg.adam_beta2, cfg.weight_decay) == (8e-5, 0.9, 0.999, 0.0)
    assert (cfg.epochs, cfg.batch_size, cfg.score_l2, cfg.gdr_lambda, cfg.temperature) == (30, 32, 1e-4, 1.0, 1.0)
    assert (cfg.mask_groups, cfg.threshold, cfg.score_init, cfg.gdr) == (("attn",), 5e-3, 1e-2, True)
    assert (TrainConfig("m", "d", "r", "o").shots, cfg.precision) == (16, "fp32")


@pytest.mark.parametrize("dataset, shots, lr, epochs, lam", [
    ("imagenet", 16, 3e-5, 10, 1.0), ("ImageNet", 4, 3e-5, 10, 1.0), ("dtd", 16, 8e-5, 30, 0.3),
    ("sun397", 16, 8e-5, 30, 1.0), ("food101", 16, 8e-5, 30, 1.0), ("eurosat", 2, 8e-5, 30, 1.0),
    ("imagefolder", 16, 8e-5, 30, 1.0),
])
def test_the_authors_per_dataset_settings_fill_what_the_user_left_out(dataset, shots, lr, epochs, lam):
    cfg = TrainConfig("m", dataset, "r", "o", shots=shots).validate()
    assert (cfg.lr, cfg.epochs, cfg.gdr_lambda) == (lr, epochs, lam)
    given = TrainConfig("m", dataset, "r", "o", shots=shots, lr=1e-3, epochs=2, gdr_lambda=0.5).validate()
    assert (given.lr, given.epochs, given.gdr_lambda) == (1e-3, 2, 0.5)


def test_unknown_config_keys_are_dropped_with_a_warning():
    data = TrainConfig("m", "d", "r", "o").to_dict() | {"future_option": 1}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TrainConfig.from_dict(data)
    assert any("future_option" in str(w.message) for w in caught)


@pytest.mark.parametrize("change, message", [
    ({"epochs": 0}, "--epochs 0"), ({"lr": -1.0}, "--lr -1.0"), ({"gdr_lambda": 1.5}, "--gdr-lambda 1.5"),
    ({"mask_groups": ("ffn",)}, "unknown mask group.*ffn.*attn, mlp, conv1"), ({"task": "bad name"}, "task name"),
    ({"score_init": 1e-3}, "must exceed the threshold"), ({"batch_size": 0}, "--batch-size 0"),
    ({"precision": "fp8"}, "--precision 'fp8' is not one of fp32, bf16, fp16"),
    ({"subsample": "half"}, "--subsample 'half' is not one of all, base, new"),
])
def test_invalid_config_values(change, message):
    with pytest.raises(InputError, match=message):
        TrainConfig("m", "dtd", "r", "o", **change).validate()


@pytest.fixture
def masked_pair(tiny_checkpoint):
    base = load_base(TINY, str(tiny_checkpoint))
    head = torch.nn.functional.normalize(torch.randn(3, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    model = MaskedCLIP(base.model, maskable_tensors(base.model), head, 14.0)
    with torch.no_grad():  # scores spread around the threshold, so masks are mixed
        model.flat_scores.copy_(torch.rand(model.flat_scores.shape, generator=torch.Generator().manual_seed(1)) * 1e-2)
    return model


def test_rmt_step_matches_the_method_by_hand(masked_pair):
    model = masked_pair
    cfg = TrainConfig(TINY, "dtd", "r", "o", lr=1e-3, gdr_lambda=1.0)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 0])
    start = model.flat_scores.detach().clone()

    # by hand: separate losses, separate backward passes, gradient dropout, one Adam step
    scores = start.clone().requires_grad_(True)
    reference = copy.copy(model)
    object.__setattr__(reference, "_parameters", dict(model._parameters, flat_scores=scores))
    student = reference(images)
    with torch.no_grad():
        teacher = reference(images, masked=False)
    l_ce = torch.nn.functional.cross_entropy(student, labels) + score_penalty(reference.scores.values(), 1e-4)
    g_ce = torch.autograd.grad(l_ce, scores, retain_graph=True)[0]
    g_kl = torch.autograd.grad(teacher_loss(student, teacher), scores)[0]
    grad = gradient_dropout(g_ce, g_kl, 1.0, torch.Generator().manual_seed(9))
    expected_opt = torch.optim.Adam([scores], lr=1e-3)
    scores.grad = grad
    expected_opt.step()

    optimizer = torch.optim.Adam([model.flat_scores], lr=1e-3)
    out = rmt_step(model, images, labels, cfg, optimizer, torch.Generator().manual_seed(9), DistContext())
    assert torch.allclose(out["loss"], l_ce.detach())
    assert torch.allclose(model.flat_scores.detach(), scores.detach(), atol=1e-7)
    assert not torch.equal(model.flat_scores.detach(), start)
    # with lambda = 1 the dropped elements did not move (Adam has no history yet)
    assert ((model.flat_scores.detach() == start) & (g_ce != 0)).any()


def test_no_gdr_step_applies_the_plain_ce_gradient(masked_pair):
    model = masked_pair
    cfg = TrainConfig(TINY, "dtd", "r", "o", gdr=False)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    scores = model.flat_scores
    loss = torch.nn.functional.cross_entropy(model(images), labels) + score_penalty(model.scores.values(), 1e-4)
    (expected,) = torch.autograd.grad(loss, [scores])
    seen = {}

    class Recorder(torch.optim.SGD):
        def step(self, closure=None):
            seen["grad"] = scores.grad.clone()

    rmt_step(model, images, labels, cfg, Recorder([scores], lr=0.1), None, DistContext())
    assert torch.allclose(seen["grad"], expected)


# ---- end to end through the CLI ----------------------------------------------------------------


def test_cli_run_writes_task_metrics_and_checkpoint(trained):
    assert sorted(p.name for p in trained.iterdir()) == ["checkpoints", "dtd.rmtask", "metrics.json"]
    assert [p.name for p in (trained / "checkpoints").iterdir()] == ["epoch_0003.pt"]
    metrics = json.loads((trained / "metrics.json").read_text())
    for key in ("test_accuracy", "zero_shot_test_accuracy", "sparsity", "sparsity_per_tensor", "epochs",
                "wall_time_s", "images_per_s", "hyperparameters"):
        assert key in metrics
    assert metrics["epochs"] == 3 and metrics["hyperparameters"]["lr"] == 2e-3
    assert len(metrics["sparsity_per_tensor"]) == 4 and metrics["images_per_s"] > 0


def test_training_lowers_the_training_loss_and_drops_weights(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    losses = [h["loss"] for h in metrics["history"]]
    assert losses[-1] < losses[0]
    assert metrics["history"][0]["sparsity"] >= 0 and metrics["sparsity"] > 0


def test_task_pack_holds_the_trained_masks(trained, tiny_checkpoint):
    pack = TaskPack.load(trained / "dtd.rmtask")
    state = torch.load(trained / "checkpoints" / "epoch_0003.pt", weights_only=True)
    offset = 0
    for name in state["names"]:
        size = pack.masks[name].size
        expected = (state["scores"][offset:offset + size] > 5e-3).numpy().reshape(pack.masks[name].shape)
        np.testing.assert_array_equal(pack.masks[name], expected)
        offset += size
    base = load_base(TINY, str(tiny_checkpoint))
    assert pack.base_fingerprint == fingerprint(TINY, maskable_tensors(base.model))
    assert pack.class_names == ["banded stripes", "dotted", "grassy field"] and pack.template == "{} texture."
    np.testing.assert_allclose(np.linalg.norm(pack.head, axis=1), 1.0, rtol=1e-5)
    assert pack.sparsity == pytest.approx(json.loads((trained / "metrics.json").read_text())["sparsity"])


def test_eval_command_reproduces_the_test_accuracy(trained, tiny_checkpoint, coop_root, capsys):
    code, out, _ = _cli(["eval", "--task", str(trained / "dtd.rmtask"), "--dataset", "dtd", "--data-root",
                         str(coop_root), "--pretrained", str(tiny_checkpoint), "--device", "cpu", "--workers", "0",
                         "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    metrics = json.loads((trained / "metrics.json").read_text())
    assert result["total"] == 12 and result["accuracy"] == pytest.approx(metrics["test_accuracy"])


def _final_scores(out):
    return torch.load(sorted((out / "checkpoints").iterdir())[-1], weights_only=True)["scores"]


def test_resume_ends_with_the_masks_of_an_uninterrupted_run(trained, tiny_checkpoint, coop_root, tmp_path,
                                                            monkeypatch, capsys):
    from rmt_deploy.training import trainer

    real_save = trainer._Run.save_checkpoint

    def save_then_crash(run):
        real_save(run)
        raise KeyboardInterrupt  # the job dies right after epoch 1's checkpoint

    monkeypatch.setattr(trainer._Run, "save_checkpoint", save_then_crash)
    args = train_args(tiny_checkpoint, coop_root, tmp_path)
    args[args.index("--workers") + 1] = "1"  # worker processes must not change the result either
    code, _, err = _cli(args, capsys)
    assert code != 0 and [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["epoch_0001.pt"]
    assert not (tmp_path / "dtd.rmtask").exists()
    monkeypatch.setattr(trainer._Run, "save_checkpoint", real_save)
    code, _, err = _cli(args + ["--resume"], capsys)
    assert code == 0, err
    assert torch.equal(_final_scores(tmp_path), _final_scores(trained))
    resumed, uninterrupted = TaskPack.load(tmp_path / "dtd.rmtask"), TaskPack.load(trained / "dtd.rmtask")
    for name, keep in uninterrupted.masks.items():
        np.testing.assert_array_equal(resumed.masks[name], keep)
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]


def test_another_seed_gives_other_masks(trained, tiny_checkpoint, coop_root, tmp_path, capsys):
    code, _, err = _cli(train_args(tiny_checkpoint, coop_root, tmp_path, "--seed", "2", "--epochs", "1"), capsys)
    assert code == 0, err
    assert not torch.equal(_final_scores(tmp_path), _final_scores(trained))


def test_template_option_sets_the_class_head(trained, tiny_checkpoint, coop_root, tmp_path, capsys):
    from rmt_deploy.basemodel.loading import load_base
    from rmt_deploy.training.evaluation import class_head

    args = train_args(tiny_checkpoint, coop_root, tmp_path, "--epochs", "1", "--template", "a close-up of {}.")
    code, _, err = _cli(args, capsys)
    assert code == 0, err
    pack = TaskPack.load(tmp_path / "dtd.rmtask")
    assert pack.template == "a close-up of {}."
    base = load_base(TINY, str(tiny_checkpoint))
    expected = class_head(base, pack.class_names, "a close-up of {}.", torch.device("cpu")).numpy()
    np.testing.assert_allclose(pack.head, expected, atol=1e-6)
    assert not np.allclose(pack.head, TaskPack.load(trained / "dtd.rmtask").head)


# ---- bad input: one line on stderr, exit 1 ------------------------------------------------------


def _fails(args, capsys, pattern):
    import re

    code, _, err = _cli(args, capsys)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert re.search(pattern, err), err


def _replace(args, option, value):
    args = list(args)
    if option in args:
        args[args.index(option) + 1] = value
        return args
    return args + [option, value]


@pytest.mark.parametrize("option, value, pattern", [
    ("--data-root", "/nonexistent/data", "data root '/nonexistent/data' does not exist"),
    ("--dataset", "dtdd", "unknown dataset 'dtdd'"),
    ("--precision", "fp64", "--precision 'fp64' is not one of fp32, bf16, fp16"),
    ("--model", "ViT-Q-99", "model 'ViT-Q-99' is unknown to open_clip"),
    ("--mask-groups", "attn,ffn", r"unknown mask group.*ffn"),
    ("--pretrained", "/nonexistent/w.safetensors", "checkpoint file '/nonexistent/w.safetensors' does not exist"),
    ("--device", "tpu", "device 'tpu' is not one of"),
    ("--template", "no placeholder", r"needs exactly one '\{\}' for the class name"),
    ("--template", "{}-{}", r"needs exactly one '\{\}' for the class name \(found: \{\}, \{\}\)"),
])
def test_bad_training_input(option, value, pattern, tiny_checkpoint, coop_root, tmp_path, capsys):
    _fails(_replace(train_args(tiny_checkpoint, coop_root, tmp_path / "out"), option, value), capsys, pattern)


def test_unwritable_output_folder(tiny_checkpoint, coop_root, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    _fails(train_args(tiny_checkpoint, coop_root, tmp_path / "file" / "out"), capsys,
           r"output folder .*file/out.* is not writable")


def test_missing_split_file_and_missing_image(tiny_checkpoint, tmp_path, capsys):
    from .conftest import write_coop_dataset

    write_coop_dataset(tmp_path / "data", counts=(4, 1, 1))
    split = tmp_path / "data" / "dtd" / "split_zhou_DescribableTextures.json"
    (tmp_path / "data" / "dtd" / "images" / "Dotted" / "test_0.png").unlink()
    _fails(train_args(tiny_checkpoint, tmp_path / "data", tmp_path / "out"), capsys, r"missing, e\.g\. .*test_0.png")
    split.unlink()
    _fails(train_args(tiny_checkpoint, tmp_path / "data", tmp_path / "out"), capsys,
           r"split file .*split_zhou_DescribableTextures.json' not found")


def test_unreadable_image_in_a_worker(tiny_checkpoint, tmp_path, capsys):
    from .conftest import write_coop_dataset

    write_coop_dataset(tmp_path / "data", counts=(4, 1, 1))
    bad = tmp_path / "data" / "dtd" / "images" / "Dotted" / "train_1.jpg"
    bad.write_bytes(b"not a jpeg")
    args = _replace(train_args(tiny_checkpoint, tmp_path / "data", tmp_path / "out"), "--workers", "1")
    _fails(args + ["--shots", "4"], capsys, r"cannot read image .*train_1.jpg")


def test_resume_without_a_checkpoint_or_with_other_settings(trained, tiny_checkpoint, coop_root, tmp_path, capsys):
    _fails(train_args(tiny_checkpoint, coop_root, tmp_path) + ["--resume"], capsys, "no checkpoint in")
    _fails(train_args(tiny_checkpoint, coop_root, trained, "--lr", "1e-3") + ["--resume"], capsys,
           r"--resume: lr was 0.002 .* now 0.001")


def test_eval_refuses_another_base_and_other_classes(trained, tiny_checkpoint, coop_root, tmp_path, capsys):
    from rmt_deploy.basemodel.loading import save_checkpoint

    torch.manual_seed(123)
    other = save_checkpoint(load_base(TINY, None).model, tmp_path / "other.safetensors")
    args = ["eval", "--task", str(trained / "dtd.rmtask"), "--dataset", "dtd", "--data-root", str(coop_root),
            "--pretrained", str(other), "--device", "cpu", "--workers", "0"]
    _fails(args, capsys, "was trained on base .* not on this base")
    for i in range(2):
        for label, cname in enumerate(("x", "y")):
            from .conftest import write_image

            write_image(tmp_path / "folder" / cname / f"{i}.png", label, i)
    args = _replace(_replace(args, "--dataset", "imagefolder"), "--data-root", str(tmp_path / "folder"))
    _fails(_replace(args, "--pretrained", str(tiny_checkpoint)), capsys,
           "has classes the task 'dtd' was not trained on .*'x'.*--text-head")


# ---- schedule, batch split, resume extension, recorded weights ---------------------------------


def test_logged_lr_is_the_rate_each_epoch_trained_with(trained):
    from rmt_deploy.training.trainer import cosine_lr

    history = json.loads((trained / "metrics.json").read_text())["history"]
    assert [h["lr"] for h in history] == [cosine_lr(2e-3, e, 3) for e in range(3)]
    assert history[0]["lr"] == 2e-3  # epoch 1 trains at the full rate, as CosineAnnealingLR's first epoch


def test_resume_can_extend_the_epochs(trained, tiny_checkpoint, coop_root, tmp_path, capsys):
    import shutil

    from rmt_deploy.training.trainer import cosine_lr

    out = tmp_path / "run"
    shutil.copytree(trained, out)
    _fails(train_args(tiny_checkpoint, coop_root, out, "--epochs", "2") + ["--resume"], capsys,
           "checkpoint is at epoch 3, beyond --epochs 2")
    code, _, err = _cli(train_args(tiny_checkpoint, coop_root, out, "--epochs", "4") + ["--resume"], capsys)
    assert code == 0, err
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and history[3]["lr"] == cosine_lr(2e-3, 3, 4)
    assert not torch.equal(_final_scores(out), _final_scores(trained))


def test_the_global_batch_splits_evenly_or_is_refused():
    from rmt_deploy.training.trainer import _per_rank_batch

    assert _per_rank_batch(32, 2) == 16 and _per_rank_batch(32, 1) == 32
    with pytest.raises(InputError, match="--batch-size 32 does not split evenly over 3 processes: use 30 or 33"):
        _per_rank_batch(32, 3)


def test_metrics_record_the_checkpoint_by_name_not_its_folder(trained, tiny_checkpoint):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["pretrained"] == tiny_checkpoint.name == "tiny.safetensors"
    assert metrics["quick_gelu"] is False and metrics["precision"] == "fp32"
    assert metrics["hyperparameters"]["pretrained"] == str(tiny_checkpoint)  # the config as run (resume checks it)
