"""The losses and the gradient-dropout regularity of R-AMT (docs/method.md)."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

SCORE_L2_WEIGHT = 1e-4
_EPS = 1e-8


def gradient_dropout(
    g_ce: torch.Tensor,
    g_kl: torch.Tensor,
    lam: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Keep each element of g_ce with probability P from its agreement with g_kl.

    P = 0.5 * (1 + sign(g_ce) * (g_ce + g_kl) / (|g_ce| + |g_kl| + 1e-8)); an
    element is kept where P > U, U ~ Uniform(0, 1), and the result is
    ((1 - lam) + lam * keep) * g_ce: same signs are always kept, lam < 1 leaks.
    """
    if g_ce.shape != g_kl.shape:
        raise ValueError(f"g_ce shape {tuple(g_ce.shape)} != g_kl shape {tuple(g_kl.shape)}")
    # P > U  <=>  sign(g_ce) * (g_ce + g_kl) > (2U - 1) * (|g_ce| + |g_kl| + eps): no division,
    # few full-size temporaries (this runs over every masked weight each step)
    agreement = g_ce + g_kl
    agreement.mul_(torch.sign(g_ce))
    scale = g_ce.abs()
    scale.add_(g_kl.abs()).add_(_EPS)
    threshold = torch.rand(g_ce.shape, generator=generator, device=g_ce.device, dtype=g_ce.dtype)
    threshold.mul_(2).sub_(1).mul_(scale)
    keep = agreement > threshold
    if lam == 1.0:
        return g_ce.masked_fill(~keep, 0.0)
    return torch.where(keep, g_ce, g_ce * (1 - lam))


def score_penalty(scores: Iterable[torch.Tensor], weight: float = SCORE_L2_WEIGHT) -> torch.Tensor:
    """weight * sum over masked tensors of ||S||_2 (un-squared norm of each flattened tensor)."""
    return weight * sum(torch.linalg.vector_norm(s.reshape(-1)) for s in scores)


def teacher_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Soft-target cross-entropy -sum softmax(t/T) * log_softmax(s/T) * T^2, batch mean (KL up to a constant)."""
    t = temperature
    target = F.softmax(teacher_logits.float() / t, dim=-1)
    log_prob = F.log_softmax(student_logits.float() / t, dim=-1)
    return -(target * log_prob).sum(dim=-1).mean() * t * t
