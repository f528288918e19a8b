"""CoOp's prompt learner over open_clip's text tower, its schedule, and a joint step with the masks."""
from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from rmt_deploy.training.prompts import WARMUP_LR, PromptLearner, coop_lr  # noqa: E402

CLASSES = ["banded", "blotchy", "braided"]


def test_a_context_initialised_from_a_phrase_reproduces_that_prompt(tiny_base):
    """With ctx = the embeddings of "a photo of a", the prompts are the text "a photo of a <class>."."""
    prompt = PromptLearner(tiny_base.model, tiny_base.tokenizer, CLASSES, ctx_init="a photo of a")
    assert prompt.n_ctx == 4 and tuple(prompt.ctx.shape) == (4, tiny_base.model.token_embedding.weight.shape[1])
    with torch.no_grad():
        ours = prompt()
        text = tiny_base.model.encode_text(tiny_base.tokenizer([f"a photo of a {c}." for c in CLASSES]))
    torch.testing.assert_close(ours, torch.nn.functional.normalize(text.float(), dim=-1), rtol=1e-5, atol=1e-6)


def test_random_context_has_coops_defaults_and_only_it_learns(tiny_base):
    prompt = PromptLearner(tiny_base.model, tiny_base.tokenizer, CLASSES, generator=torch.Generator().manual_seed(0))
    assert prompt.n_ctx == 16 and 0.01 < float(prompt.ctx.detach().std()) < 0.03
    assert [name for name, _ in prompt.named_parameters()] == ["ctx"]
    loss = prompt()[:, 0].sum()
    (grad,) = torch.autograd.grad(loss, [prompt.ctx])
    assert float(grad.abs().sum()) > 0
    assert not any(p.requires_grad for n, p in tiny_base.model.named_parameters() if not n.startswith("visual."))


def test_coop_schedule_is_a_constant_warmup_epoch_then_cosine():
    rates = [coop_lr(0.002, e, 10) for e in range(11)]
    assert rates[0] == WARMUP_LR and rates[1] == 0.002
    assert all(a > b for a, b in zip(rates[1:], rates[2:]))
    assert rates[6] == pytest.approx(0.002 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
