"""Precision: fp32 by default; under bf16/fp16 autocast the logits, losses and gradient dropout stay fp32."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from rmt_deploy.basemodel.loading import load_base, maskable_tensors  # noqa: E402
from rmt_deploy.errors import InputError  # noqa: E402
from rmt_deploy.training.distributed import DistContext  # noqa: E402
from rmt_deploy.training.masking import MaskedCLIP  # noqa: E402
from rmt_deploy.training.precision import LossScaler, autocast, check_precision  # noqa: E402
from rmt_deploy.training.trainer import TrainConfig, rmt_step  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture
def model(tiny_checkpoint):
    base = load_base("rmt-tiny-vit", str(tiny_checkpoint))
    head = torch.nn.functional.normalize(torch.randn(3, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    return MaskedCLIP(base.model, maskable_tensors(base.model), head, 100.0)


def test_fp32_is_the_default():
    assert TrainConfig("m", "dtd", "r", "o").precision == "fp32"
    from rmt_deploy.training.evaluation import EvalConfig

    assert EvalConfig("t.rmtask", "dtd", "r").precision == "fp32"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_logits_are_fp32_under_autocast_while_the_tower_is_not(model, precision):
    images = torch.randn(2, 3, 32, 32)
    with autocast(CPU, precision):
        features = model.image_features(images)
        logits = model(images)
    assert features.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert logits.dtype == torch.float32
    reference = model.logit_scale * torch.nn.functional.normalize(features.float(), dim=-1) @ model.head.t()
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5)  # the fp32 product of the bf16 features


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_low_precision_step_trains_fp32_scores(model, precision):
    cfg = TrainConfig("m", "dtd", "r", "o", precision=precision, gdr_lambda=1.0).validate()
    optimizer = torch.optim.Adam([model.flat_scores], lr=1e-3)
    before = model.flat_scores.detach().clone()
    scaler = LossScaler(precision == "fp16")
    for _ in range(24):  # fp16: steps whose scaled gradients overflow are skipped while the scale backs off
        out = rmt_step(model, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]), cfg, optimizer,
                       torch.Generator().manual_seed(0), DistContext(), scaler)
        if not torch.equal(model.flat_scores, before):
            break
    assert out["logits"].dtype == torch.float32 and out["loss"].dtype == torch.float32
    assert model.flat_scores.dtype == torch.float32 and not torch.equal(model.flat_scores, before)
    assert torch.isfinite(model.flat_scores).all()


def test_fp16_loss_scaling_skips_an_overflowing_step_and_backs_off():
    scaler = LossScaler(enabled=True, scale=1024.0, interval=2)
    good = torch.full((3,), 2048.0)
    assert scaler.unscale(good) and torch.equal(good, torch.full((3,), 2.0))
    assert scaler.unscale(torch.ones(2)) and scaler.scale == 2048.0  # two good steps: the scale doubles
    assert not scaler.unscale(torch.tensor([1.0, float("inf")])) and scaler.scale == 1024.0
    assert LossScaler(enabled=False).scaled(torch.tensor(3.0)) == 3.0


def test_unknown_precision_is_one_line_error():
    with pytest.raises(InputError, match="--precision 'fp8' is not one of fp32, bf16, fp16"):
        check_precision("fp8", CPU)


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(InputError, match="bf16 but Tesla V100 has no bfloat16 support: use --precision fp32"):
        check_precision("bf16", torch.device("cuda"))
    assert check_precision("fp16", torch.device("cuda")) == "fp16"


def test_help_states_the_default(capsys):
    from rmt_deploy.cli import main

    for command in ("train", "eval"):
        main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--precision TEXT fp32 (default, as the paper)" in text and "[default: fp32]" in text
