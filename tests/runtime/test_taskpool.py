"""TaskPool: LRU of dense masked buffers rewritten in place, checked with plain numpy arrays."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rmt_deploy.errors import InputError, UnknownTaskError
from rmt_deploy.runtime.taskpool import TaskPool, TensorSpec

SHAPES = {"a": (6, 5), "b": (7,), "c": (3, 2, 4)}


def _setup(capacity: int, tasks=("t0", "t1", "t2"), zeros=0.3, seed=0):
    rng = np.random.default_rng(seed)
    base = {k: rng.standard_normal(s).astype(np.float32) + 3 for k, s in SHAPES.items()}
    specs = [TensorSpec(k, s, np.dtype(np.float32), k) for k, s in SHAPES.items()]
    reads = []

    def read_base(arrays):
        for key, out in arrays.items():
            reads.append(key)
            out[...] = base[key]

    pool = TaskPool(specs, read_base, capacity)
    masks = {}
    for t in tasks:
        masks[t] = {k: rng.random(s) >= zeros for k, s in SHAPES.items()}
        pool.add(t, {k: np.flatnonzero(~m).astype(np.int32) for k, m in masks[t].items()})
    return pool, base, masks, reads


def _check(lease, base, masks):
    for key, array in lease.arrays.items():
        np.testing.assert_array_equal(array, base[key] * masks[lease.task][key])


@settings(max_examples=40, deadline=None)
@given(capacity=st.integers(1, 3), order=st.lists(st.sampled_from(["t0", "t1", "t2", "t3"]), max_size=12))
def test_every_lease_holds_exactly_its_tasks_masked_weights(capacity, order):
    pool, base, masks, reads = _setup(capacity, tasks=("t0", "t1", "t2", "t3"))
    for task in order:
        with pool.lease(task) as lease:
            assert lease.task == task
            _check(lease, base, masks)
    assert len(pool._slots) <= capacity
    assert reads == list(SHAPES)  # the base file is read once, into the first buffer


def test_cached_tasks_are_hits_and_lru_is_evicted():
    pool, base, masks, _ = _setup(2)
    for task in ["t0", "t1", "t0", "t2", "t0", "t1"]:
        with pool.lease(task):
            pass
    assert pool.stats.hits == 2 and pool.stats.misses == 4
    assert pool.resident() == ["t1", "t0"]


def test_overlapping_zeros_restore_exact_base_values():
    pool, base, masks, _ = _setup(1, tasks=("t0", "t1"), zeros=0.7)  # most zeros overlap
    for task in ["t0", "t1", "t0", "t1"]:
        with pool.lease(task) as lease:
            _check(lease, base, masks)


def test_task_added_while_a_masked_buffer_is_resident_gets_true_base_values():
    pool, base, masks, _ = _setup(1, tasks=("t0",), zeros=0.5)
    with pool.lease("t0"):
        pass
    rng = np.random.default_rng(9)
    masks["late"] = {k: rng.random(s) >= 0.5 for k, s in SHAPES.items()}
    pool.add("late", {k: np.flatnonzero(~m) for k, m in masks["late"].items()})
    for task in ["late", "t0", "late"]:
        with pool.lease(task) as lease:
            _check(lease, base, masks)


def test_a_leased_buffer_is_never_rewritten_until_released():
    pool, base, masks, _ = _setup(1)
    first = pool.acquire("t0")
    got = {}

    def other():
        with pool.lease("t1") as lease:
            got["task"] = lease.task
            _check(lease, base, masks)

    thread = threading.Thread(target=other)
    thread.start()
    time.sleep(0.05)
    assert "task" not in got  # waiting: the only buffer is pinned by t0
    _check(first, base, masks)
    pool.release(first)
    thread.join(5)
    assert got["task"] == "t1" and pool.stats.waits >= 1


def test_tasks_are_stored_compactly():
    pool, _, masks, _ = _setup(1, zeros=0.025)
    zeros = sum(int((~m).sum()) for m in masks["t0"].values())
    assert pool.task_nbytes("t0") == 12 * zeros  # int64 index + fp32 base value per zero


def test_int32_indices_are_stored_as_intp_and_rewrites_stay_exact():
    pool, base, masks, _ = _setup(1, tasks=("t0",), zeros=0.4)
    rng = np.random.default_rng(4)
    masks["wide"] = {k: rng.random(s) >= 0.4 for k, s in SHAPES.items()}
    pool.add("wide", {k: np.flatnonzero(~m).astype(np.int32) for k, m in masks["wide"].items()})
    assert {a.dtype for a in pool._tasks["wide"].zeros.values()} == {np.dtype(np.intp)}
    for task in ["wide", "t0", "wide", "t0"]:  # one buffer: every switch rewrites it in place
        with pool.lease(task) as lease:
            _check(lease, base, masks)


def _wait_for(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_acquire_waiting_when_the_pool_closes_gets_input_error():
    pool, _, _, _ = _setup(1)
    held = pool.acquire("t0")  # the only buffer: the next acquire waits
    errors: list[BaseException] = []

    def waiter():
        try:
            pool.release(pool.acquire("t1"))
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    blocked = threading.Thread(target=waiter)
    blocked.start()
    _wait_for(lambda: pool.stats.waits >= 1)
    closer = threading.Thread(target=pool.close)  # waits for `held`, but wakes the waiter at once
    closer.start()
    blocked.join(5)
    alive = blocked.is_alive()
    pool.release(held)
    closer.join(5)
    blocked.join(5)
    assert not alive, "acquire kept waiting on a closed pool"
    assert not closer.is_alive() and not blocked.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], InputError) and "closed" in str(errors[0]), errors


def test_add_and_acquire_after_close_are_input_errors():
    pool, _, _, _ = _setup(1)
    pool.close()
    with pytest.raises(InputError, match="closed"):
        pool.add("late", {k: np.zeros(0, np.int64) for k in SHAPES})
    with pytest.raises(InputError, match="closed"):
        pool.acquire("t0")


def test_unknown_task_duplicate_task_and_bad_capacity():
    pool, _, _, _ = _setup(1)
    with pytest.raises(UnknownTaskError, match="available: t0, t1, t2"):
        pool.acquire("nope")
    with pytest.raises(InputError, match="already loaded"):
        pool.add("t0", {k: np.zeros(0, np.int64) for k in SHAPES})
    with pytest.raises(InputError, match="cache_tasks=0"):
        TaskPool([], lambda arrays: None, 0)


@pytest.mark.parametrize("shape, perm", [((6, 4), (1, 0)), ((3, 4, 5), (2, 0, 1)), ((7,), None)])
def test_stored_indices_follow_a_transposed_layout(shape, perm):
    rng = np.random.default_rng(3)
    keep = rng.random(shape) >= 0.3
    stored_shape = tuple(shape[p] for p in perm) if perm else shape
    spec = TensorSpec("w", stored_shape, np.dtype(np.float32), "w", perm)
    expected = np.flatnonzero(~(np.transpose(keep, perm) if perm else keep))
    np.testing.assert_array_equal(spec.stored_indices(np.flatnonzero(~keep)), expected)
