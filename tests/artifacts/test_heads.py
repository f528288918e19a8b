"""Task heads: the logits of each kind, their validation, and how a TaskPack stores and reads them."""
from __future__ import annotations

import json

import numpy as np
import pytest

from rmt_deploy.artifacts.heads import Cache, HeadMath, check_alpha_beta, check_kind, head_nbytes, logits
from rmt_deploy.artifacts.task_file import TaskPack, read_encoded
from rmt_deploy.errors import ArtifactError, InputError

DIM, CLASSES, SHOTS = 8, 3, 4


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _cache(rng: np.random.Generator, alpha: float = 2.0, beta: float = 5.0) -> Cache:
    labels = np.repeat(np.arange(CLASSES), SHOTS)
    return Cache.build(_unit(rng, CLASSES * SHOTS, DIM), labels, alpha, beta, CLASSES, DIM)


def _pack(kind: str = "zeroshot", cache: Cache | None = None, seed: int = 0) -> TaskPack:
    rng = np.random.default_rng(seed)
    return TaskPack(
        name="dtd", class_names=["banded", "blotchy", "braided"], head=_unit(rng, CLASSES, DIM),
        masks={"visual.transformer.resblocks.0.attn.out_proj.weight": rng.random((16, 16)) > 0.1},
        base_fingerprint="sha256:" + "ab" * 32, model_name="rmt-tiny-vit", head_kind=kind, cache=cache)


def test_tip_adapter_logits_follow_the_formula():
    rng = np.random.default_rng(1)
    text, cache, f = _unit(rng, CLASSES, DIM), _cache(rng), _unit(rng, 5, DIM)
    keys = cache.keys.astype(np.float64)
    onehot = np.eye(CLASSES)[cache.labels]
    expected = 100 * f @ text.T + cache.alpha * np.exp(-cache.beta * (1 - f @ keys.T)) @ onehot
    got = logits(f, text, 100.0, cache)
    assert got.dtype == np.float32 and got.shape == (5, CLASSES)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_zeroshot_logits_are_scaled_cosines_and_alpha_zero_adds_nothing():
    rng = np.random.default_rng(2)
    text, f = _unit(rng, CLASSES, DIM), _unit(rng, 4, DIM)
    np.testing.assert_allclose(logits(f, text, 50.0), 50 * f @ text.T, rtol=1e-6)
    np.testing.assert_allclose(logits(f, text, 50.0, _cache(rng, alpha=0.0)), 50 * f @ text.T, rtol=1e-6)


def test_a_cache_key_equal_to_the_image_votes_for_its_class():
    rng = np.random.default_rng(3)
    cache = _cache(rng, alpha=10.0, beta=50.0)
    text = np.zeros((CLASSES, DIM), np.float32)  # no text evidence: the cache decides
    f = cache.keys[[0, SHOTS, 2 * SHOTS]].astype(np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    assert list(HeadMath(text, 100.0, cache).logits(f).argmax(1)) == [0, 1, 2]


@pytest.mark.parametrize("kind", ["zeroshot", "coop", "tip-adapter", "tip-adapter-f"])
def test_every_kind_round_trips_through_a_task_file(tmp_path, kind):
    cache = _cache(np.random.default_rng(4)) if kind.startswith("tip") else None
    pack = _pack(kind, cache)
    loaded = TaskPack.load(pack.save(tmp_path / "dtd.rmtask"))
    assert loaded.head_kind == kind
    np.testing.assert_array_equal(loaded.head, pack.head)
    if cache is None:
        assert loaded.cache is None
    else:
        assert loaded.cache.keys.dtype == np.float16 and (loaded.cache.alpha, loaded.cache.beta) == (2.0, 5.0)
        np.testing.assert_array_equal(loaded.cache.keys, cache.keys)
        np.testing.assert_array_equal(loaded.cache.labels, cache.labels)
    encoded = read_encoded(tmp_path / "dtd.rmtask")
    assert encoded.meta["version"] == (1 if kind == "zeroshot" else 2) and encoded.head_kind == kind


def test_a_version_1_file_written_by_the_old_code_path_still_loads(tmp_path):
    """Version 1 is exactly what rmt-deploy wrote before heads had kinds: no `head` entry, no cache tensors."""
    path = _pack().save(tmp_path / "old.rmtask")
    meta = read_encoded(path).meta
    assert meta["version"] == 1 and "head" not in meta
    assert TaskPack.load(path).head_kind == "zeroshot"


def test_head_bytes_count_text_and_cache():
    rng = np.random.default_rng(5)
    cache = _cache(rng)
    text = _unit(rng, CLASSES, DIM)
    assert cache.nbytes == CLASSES * SHOTS * (DIM * 2 + 8)
    assert head_nbytes(text, cache) == text.nbytes + cache.nbytes and head_nbytes(text, None) == text.nbytes


def test_unknown_head_is_one_clear_error():
    with pytest.raises(InputError, match=r"head 'tip' is not one of zeroshot, coop, tip-adapter, tip-adapter-f"):
        check_kind("tip")
    with pytest.raises(InputError, match="head 'lora'"):
        _pack("lora")


@pytest.mark.parametrize("alpha, beta, bad", [
    (-1.0, 1.0, "alpha -1.0"), (101.0, 1.0, "alpha 101.0"), (float("nan"), 1.0, "alpha nan"),
    (1.0, 0.0, "beta 0.0"), (1.0, 1e3, "beta 1000.0"), (1.0, "2", "beta '2'"), (True, 1.0, "alpha True"),
])
def test_alpha_and_beta_out_of_range_are_refused(alpha, beta, bad):
    with pytest.raises(InputError, match=f"tip-adapter {bad} is out of range: use a number in"):
        check_alpha_beta(alpha, beta)


def test_a_cache_that_does_not_match_the_class_count_is_refused():
    rng = np.random.default_rng(6)
    keys = _unit(rng, 8, DIM)
    with pytest.raises(InputError, match="cache label 3 does not match the task's 3 classes"):
        Cache.build(keys, np.array([0, 1, 2, 3, 0, 1, 2, 0]), 1.0, 1.0, CLASSES, DIM)
    with pytest.raises(InputError, match="no key for class 2 of 3"):
        Cache.build(keys, np.array([0, 1, 0, 1, 0, 1, 0, 1]), 1.0, 1.0, CLASSES, DIM)
    with pytest.raises(InputError, match=r"labels are int64 \[7\], not integers \[8\]"):
        Cache.build(keys, np.zeros(7, np.int64), 1.0, 1.0, CLASSES, DIM)
    with pytest.raises(InputError, match=r"keys are \[8, 8\], not \[keys .*, 16\]"):
        Cache.build(keys, np.repeat(np.arange(3), 3)[:8], 1.0, 1.0, CLASSES, 16)


def test_kind_and_cache_must_agree():
    with pytest.raises(InputError, match="needs"):
        _pack("tip-adapter", None)
    with pytest.raises(InputError, match="takes no"):
        _pack("coop", _cache(np.random.default_rng(7)))


def _rewrite(path, edit_meta=None, edit_tensors=None):
    """Re-save a task file with its metadata or tensors changed and a valid checksum (a crafted file)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from rmt_deploy.artifacts.task_file import CHECKSUM_KEY, METADATA_KEY, _checksum

    with safe_open(str(path), "np") as handle:
        meta = json.loads(handle.metadata()[METADATA_KEY])
    tensors = load_file(str(path))
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    text = json.dumps(meta)
    save_file(tensors, str(path), metadata={METADATA_KEY: text, CHECKSUM_KEY: _checksum(text, tensors)})


@pytest.mark.parametrize("edit_meta, edit_tensors, message", [
    (lambda m: m["head"].update(kind="prefix"), None, "head 'prefix' is not one of"),
    (lambda m: m["head"].update(alpha=500.0), None, "alpha 500.0 is out of range"),
    (lambda m: m["head"].update(beta=-2), None, "beta -2 is out of range"),
    (lambda m: m.pop("head"), None, "no `head` entry"),
    (lambda m: m.update(class_names=["a", "b"]), lambda t: t.update(head=t["head"][:2]), "cache label 2 does not "
     "match the task's 2 classes"),
    (None, lambda t: t.update({"cache/keys": t["cache/keys"].astype(np.float32)}), "not float16"),
    (None, lambda t: t.update({"cache/keys": t["cache/keys"][:, :4].copy()}), r"keys are \[12, 4\]"),
    (None, lambda t: t.update({"cache/labels": t["cache/labels"].astype(np.float32)}), "labels are float32"),
    (None, lambda t: t.pop("cache/labels"), "missing"),
])
def test_a_crafted_cache_is_refused_before_use(tmp_path, edit_meta, edit_tensors, message):
    path = _pack("tip-adapter", _cache(np.random.default_rng(8))).save(tmp_path / "dtd.rmtask")
    _rewrite(path, edit_meta, edit_tensors)
    with pytest.raises(ArtifactError, match=message) as info:
        TaskPack.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
