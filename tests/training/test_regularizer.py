"""Gradient dropout and the R-AMT losses."""
from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from rmt_deploy.training.regularizer import gradient_dropout, score_penalty, teacher_loss  # noqa: E402

N = 200_000


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_same_signs_are_always_kept():
    g_ce = torch.rand(N) + 0.01
    g_kl = torch.rand(N) * 5
    assert torch.equal(gradient_dropout(g_ce, g_kl, 1.0, _gen()), g_ce)
    assert torch.equal(gradient_dropout(-g_ce, -g_kl, 1.0, _gen()), -g_ce)


def test_opposite_signs_keep_rate_matches_formula():
    # P = 0.5 * (1 + (0.2 - 0.6) / 0.8) = 0.25
    g_ce = torch.full((N,), 0.2)
    g_kl = torch.full((N,), -0.6)
    out = gradient_dropout(g_ce, g_kl, 1.0, _gen(1))
    kept = (out != 0).float().mean().item()
    assert torch.equal(out.unique(), torch.tensor([0.0, 0.2]))
    assert abs(kept - 0.25) < 4 * math.sqrt(0.25 * 0.75 / N)


def test_kl_dominating_with_opposite_sign_is_mostly_dropped():
    g_ce = torch.full((N,), -0.01)
    g_kl = torch.full((N,), 1.0)
    kept = (gradient_dropout(g_ce, g_kl, 1.0, _gen(2)) != 0).float().mean().item()
    assert kept < 0.02


def test_lambda_below_one_leaks():
    g_ce = torch.full((N,), 0.2)
    g_kl = torch.full((N,), -0.6)
    out = gradient_dropout(g_ce, g_kl, 0.3, _gen(3))
    values = set(round(v, 6) for v in out.unique().tolist())
    assert values == {round(0.7 * 0.2, 6), 0.2}
    assert gradient_dropout(g_ce, g_kl, 0.0, _gen(3)).equal(g_ce)


def test_only_g_ce_is_ever_applied():
    g_ce = torch.randn(N)
    g_kl = torch.randn(N)
    out = gradient_dropout(g_ce, g_kl, 1.0, _gen(4))
    kept = out != 0
    assert torch.equal(out[kept], g_ce[kept])


def test_generator_makes_it_reproducible():
    g_ce, g_kl = torch.randn(1000), torch.randn(1000)
    assert torch.equal(gradient_dropout(g_ce, g_kl, 1.0, _gen(5)), gradient_dropout(g_ce, g_kl, 1.0, _gen(5)))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        gradient_dropout(torch.zeros(3), torch.zeros(4), 1.0)


def test_score_penalty_is_unsquared_l2_per_tensor():
    a, b = torch.full((3, 4), 0.5), torch.tensor([3.0, 4.0])
    assert score_penalty([a, b]).item() == pytest.approx(1e-4 * (math.sqrt(12 * 0.25) + 5.0))


def test_teacher_loss_is_soft_cross_entropy():
    student = torch.tensor([[2.0, 0.0, -1.0]])
    teacher = torch.tensor([[0.0, 1.0, 0.0]])
    target = torch.softmax(teacher, -1)
    expected = -(target * torch.log_softmax(student, -1)).sum()
    assert teacher_loss(student, teacher).item() == pytest.approx(expected.item())
    entropy = -(target * target.log()).sum()
    assert teacher_loss(teacher, teacher).item() == pytest.approx(entropy.item())
