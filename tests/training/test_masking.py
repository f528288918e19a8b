"""Score tensors, the straight-through binariser, and the in-place mask verbs."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rmt_deploy.basemodel.loading import load_base, maskable_tensors  # noqa: E402
from rmt_deploy.errors import InputError  # noqa: E402
from rmt_deploy.training.masking import (  # noqa: E402
    SCORE_INIT,
    THRESHOLD,
    MaskedCLIP,
    applied_masks,
    apply_masks_,
    binarize,
    fold_masks_,
    masked_weight,
    remove_masks_,
)

TINY = "rmt-tiny-vit"


@pytest.fixture
def base(tiny_checkpoint):
    """A fresh copy of the tiny base (these tests change it in place)."""
    return load_base(TINY, str(tiny_checkpoint))


def _masked(base, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.functional.normalize(torch.randn(classes, base.model.visual.output_dim, generator=gen), dim=-1)
    names = list(maskable_tensors(base.model))
    return MaskedCLIP(base.model, names, head, logit_scale=float(base.model.logit_scale.detach().exp()))


def test_binarize_thresholds_strictly_above():
    score = torch.tensor([0.0, 4.9e-3, 5e-3, 5.1e-3, 1e-2, -1.0])
    assert binarize(score).tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    assert THRESHOLD == 5e-3 and SCORE_INIT == 1e-2


def test_binarize_gradient_is_straight_through():
    score = torch.tensor([-1.0, 0.001, 0.02, 3.0], requires_grad=True)
    upstream = torch.tensor([0.5, -2.0, 3.0, 7.0])
    (binarize(score) * upstream).sum().backward()
    assert torch.equal(score.grad, upstream)


def test_masked_weight_gradient_is_grad_times_weight():
    weight = torch.randn(5, 4)
    score = torch.full((5, 4), SCORE_INIT)
    score[0, 0] = 0.0  # masked off: the gradient still reaches it, so it can come back
    score.requires_grad_(True)
    upstream = torch.randn(5, 4)
    out = masked_weight(weight, score)
    assert out[0, 0] == 0 and torch.equal(out[1:], weight[1:])
    (out * upstream).sum().backward()
    assert torch.allclose(score.grad, upstream * weight)
    reference = score.detach().clone().requires_grad_(True)
    (weight * binarize(reference) * upstream).sum().backward()
    assert torch.allclose(score.grad, reference.grad)


def test_masks_start_all_ones_and_student_equals_base(base):
    torch.manual_seed(1)
    model = _masked(base)
    assert model.sparsity() == 0.0
    assert all(bool(m.all()) for m in model.binary_masks().values())
    assert torch.equal(model.flat_scores, torch.full_like(model.flat_scores, SCORE_INIT))
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        student = model(images)
        teacher = model(images, masked=False)
        plain = base.model.encode_image(images, normalize=True) @ model.head.t() * model.logit_scale
    assert torch.allclose(student, teacher, atol=1e-4)
    assert torch.allclose(teacher, plain, atol=1e-5)


def test_scores_get_gradients_and_frozen_weights_do_not(base):
    model = _masked(base)
    before = {n: p.detach().clone() for n, p in base.model.visual.named_parameters()}
    model(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum().backward()
    assert model.flat_scores.grad is not None and model.flat_scores.grad.abs().sum() > 0
    for name, param in base.model.visual.named_parameters():
        assert param.grad is None
        assert torch.equal(param, before[name])


def test_dropping_a_score_below_threshold_changes_the_student_only(base):
    model = _masked(base)
    name = model.names[0]
    with torch.no_grad():
        model.scores[name].fill_(0.0)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(model(images), model(images, masked=False))
    masks = model.binary_masks()
    assert not masks[name].any() and masks[model.names[1]].all()
    expected = masks[name].numel() / model.flat_scores.numel()
    assert model.sparsity() == pytest.approx(expected)


def test_apply_then_remove_restores_base_exactly(base):
    params = dict(base.model.named_parameters())
    original = {n: params[n].detach().clone() for n in maskable_tensors(base.model)}
    rng = np.random.default_rng(0)
    masks = {n: rng.random(tuple(t.shape)) > 0.1 for n, t in original.items()}
    apply_masks_(base.model, masks)
    assert applied_masks(base.model) == sorted(masks)
    for name, keep in masks.items():
        assert torch.equal(params[name], original[name] * torch.from_numpy(keep))
    # a second apply is a switch: it starts from the base, not from the masked weights
    other = {n: torch.from_numpy(rng.random(tuple(t.shape)) > 0.5) for n, t in original.items()}
    apply_masks_(base.model, other)
    for name, keep in other.items():
        assert torch.equal(params[name], original[name] * keep)
    remove_masks_(base.model)
    for name in original:
        assert torch.equal(params[name], original[name])
    assert applied_masks(base.model) == []


def test_applied_masks_match_the_student_forward(base):
    model = _masked(base)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.flat_scores.copy_(torch.rand(model.flat_scores.shape, generator=gen) * 0.02)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        student = model(images)
        apply_masks_(base.model, model.binary_masks())
        applied = model(images, masked=False)
    assert model.sparsity() > 0.1
    assert torch.allclose(student, applied, atol=1e-4)


def test_fold_is_permanent(base):
    params = dict(base.model.named_parameters())
    name = next(iter(maskable_tensors(base.model)))
    keep = np.ones(tuple(params[name].shape), dtype=bool)
    keep[0] = False
    fold_masks_(base.model, {name: keep})
    assert applied_masks(base.model) == []
    remove_masks_(base.model)
    assert bool((params[name][0] == 0).all())
    with pytest.raises(InputError, match="no masks to fold"):
        fold_masks_(base.model)


@pytest.mark.parametrize(
    "masks, message",
    [
        ({"visual.nope.weight": np.ones((2, 2), bool)}, "not a parameter"),
        ({"visual.transformer.resblocks.0.attn.out_proj.weight": np.ones((2, 2), bool)}, "shape"),
        ({"visual.transformer.resblocks.0.attn.out_proj.weight": np.ones((64, 64), np.float32)}, "bool"),
    ],
)
def test_bad_masks_are_refused_without_changing_the_model(base, masks, message):
    before = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    with pytest.raises(InputError, match=message):
        apply_masks_(base.model, masks)
    for name, param in base.model.named_parameters():
        assert torch.equal(param, before[name])


def test_taskpack_masks_apply(base, make_taskpack):
    pack = make_taskpack("pets", seed=2, zeros=0.2)
    apply_masks_(base.model, pack.masks)
    params = dict(base.model.named_parameters())
    for name, keep in pack.masks.items():
        assert bool((params[name][torch.from_numpy(~keep)] == 0).all())
