"""TaskPool: LRU of dense masked buffers rewritten in place from a pristine base, checked with plain numpy arrays."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rmt_deploy.errors import ArtifactError, InputError, InternalError
from rmt_deploy.runtime.buffer_pool import BASE, TaskPool, TensorSpec, ZeroSet

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
    masks = {t: {k: rng.random(s) >= zeros for k, s in SHAPES.items()} for t in tasks}
    return pool, base, masks, reads


def _zeros(pool, masks, task):
    """The loader of a task's ZeroSets the pool calls on a miss, counting its calls."""
    def load():
        load.calls += 1
        return {k: pool.zero_set(k, np.flatnonzero(~m)) for k, m in masks[task].items()}
    load.calls = 0
    return load


def _lease(pool, masks, task):
    return pool.lease(task, _zeros(pool, masks, task))


def _check(lease, base, masks):
    for key, array in lease.arrays.items():
        np.testing.assert_array_equal(array, base[key] * masks[lease.task][key])


@settings(max_examples=40, deadline=None)
@given(capacity=st.integers(1, 3), order=st.lists(st.sampled_from(["t0", "t1", "t2", "t3"]), max_size=12))
def test_every_lease_holds_exactly_its_tasks_masked_weights(capacity, order):
    pool, base, masks, reads = _setup(capacity, tasks=("t0", "t1", "t2", "t3"))
    for task in order:
        with _lease(pool, masks, task) as lease:
            assert lease.task == task
            _check(lease, base, masks)
    assert len(pool._slots) <= capacity
    assert reads == list(SHAPES)  # the base file is read once, into the first buffer, and never again


def test_cached_tasks_are_hits_and_lru_is_evicted():
    pool, base, masks, _ = _setup(2)
    for task in ["t0", "t1", "t0", "t2", "t0", "t1"]:
        with _lease(pool, masks, task):
            pass
    assert pool.stats.hits == 2 and pool.stats.misses == 4
    assert pool.resident() == ["t1", "t0"]


def test_a_hit_does_not_ask_for_the_zero_indices():
    pool, base, masks, _ = _setup(1)
    first, second = _zeros(pool, masks, "t0"), _zeros(pool, masks, "t0")
    pool.release(pool.acquire("t0", first))
    pool.release(pool.acquire("t0", second))
    assert (first.calls, second.calls) == (1, 0)


def test_overlapping_zeros_restore_exact_base_values():
    pool, base, masks, _ = _setup(1, tasks=("t0", "t1"), zeros=0.7)  # most zeros overlap
    for task in ["t0", "t1", "t0", "t1"]:
        with _lease(pool, masks, task) as lease:
            _check(lease, base, masks)


def test_the_base_pseudo_task_is_the_unmasked_weights():
    pool, base, masks, _ = _setup(1)
    for task in ["t0", BASE, "t1", BASE]:
        with pool.lease(task, _zeros(pool, masks, task) if task != BASE else None) as lease:
            for key, array in lease.arrays.items():
                np.testing.assert_array_equal(array, base[key] * masks[task][key] if task != BASE else base[key])


def test_a_leased_buffer_is_never_rewritten_until_released():
    pool, base, masks, _ = _setup(1)
    first = pool.acquire("t0", _zeros(pool, masks, "t0"))
    got = {}

    def other():
        with _lease(pool, masks, "t1") as lease:
            got["task"] = lease.task
            _check(lease, base, masks)

    thread = threading.Thread(target=other)
    thread.start()
    time.sleep(0.05)
    assert "task" not in got  # waiting: the only buffer is pinned by t0
    _check(first, base, masks)
    pool.release(first)
    thread.join(30)
    assert got["task"] == "t1" and pool.stats.waits >= 1


def test_a_failing_loader_leaves_the_buffer_as_it_was():
    pool, base, masks, _ = _setup(1)
    with _lease(pool, masks, "t0"):
        pass

    def broken():
        raise ArtifactError("t1.rmtask: damaged")

    with pytest.raises(ArtifactError, match="damaged"):
        pool.acquire("t1", broken)
    assert pool.resident() == ["t0"]
    with _lease(pool, masks, "t0") as lease:
        _check(lease, base, masks)
    assert pool.stats.hits == 1


def _sets(indices, values=None, dtype=np.intp, value_dtype=np.float32):
    return {k: ZeroSet(np.array(indices, dtype), np.dtype(value_dtype), values) for k in SHAPES}


def test_bad_zero_sets_are_refused_before_any_write():
    pool, base, masks, _ = _setup(1)
    for bad in ({"a": pool.zero_set("a", [1])}, _sets([3, 1]), _sets([10**6]), _sets([1], dtype=np.int32),
                _sets([1, 2], values=np.ones(1, np.float32)), _sets([1], values=np.ones(1, np.float64)),
                _sets([1], value_dtype=np.float16),
                {k: np.array([1], np.intp) for k in SHAPES}):
        with pytest.raises(InternalError):
            pool.acquire("t0", lambda bad=bad: bad)
    with pool.lease(BASE, None) as lease:
        for key, array in lease.arrays.items():
            np.testing.assert_array_equal(array, base[key])


def test_zero_sets_keep_the_base_values_a_rewrite_read_and_refuse_bad_indices():
    pool, base, masks, _ = _setup(1, tasks=("t0", "t1"), zeros=0.7)  # most zeros overlap
    sets = {t: {k: pool.zero_set(k, np.flatnonzero(~m)) for k, m in masks[t].items()} for t in masks}
    assert sets["t0"]["a"].base_values is None and sets["t0"]["a"].nbytes == sets["t0"]["a"].indices.size * 12
    for task in ("t0", "t1", "t0", "t1"):  # t1's values are read while t0's zeros were in the buffer
        with pool.lease(task, lambda task=task: sets[task]) as lease:
            _check(lease, base, masks)
    for task, per_key in sets.items():
        for key, zeros in per_key.items():
            np.testing.assert_array_equal(zeros.base_values, base[key].reshape(-1)[zeros.indices])
    for bad_key, bad in (("a", [4, 2]), ("a", [30]), ("a", [-1]), ("zz", [1]), ("a", [[1]])):
        with pytest.raises(InternalError):
            pool.zero_set(bad_key, np.array(bad))


def test_evict_waits_for_runs_then_restores_the_base_values():
    pool, base, masks, _ = _setup(2)
    held = pool.acquire("t0", _zeros(pool, masks, "t0"))
    done = threading.Event()
    evictor = threading.Thread(target=lambda: (pool.evict("t0"), done.set()))
    evictor.start()
    time.sleep(0.05)
    assert not done.is_set()  # t0 is still leased
    _check(held, base, masks)
    pool.release(held)
    evictor.join(30)
    assert done.is_set() and pool.resident() == [] and not pool.evict("t0")
    with pool.lease(BASE, None) as lease:
        assert lease.slot == held.slot
        for key, array in lease.arrays.items():
            np.testing.assert_array_equal(array, base[key])


def test_misses_on_one_buffer_do_not_block_hits_on_another():
    pool, base, masks, _ = _setup(2)
    with _lease(pool, masks, "t0"):
        pass
    entered, leave = threading.Event(), threading.Event()

    def slow():
        entered.set()
        assert leave.wait(5)
        return _zeros(pool, masks, "t1")()

    rewriting = threading.Thread(target=lambda: pool.release(pool.acquire("t1", slow)))
    rewriting.start()
    assert entered.wait(5)
    with _lease(pool, masks, "t0") as lease:  # a hit while t1 is being loaded
        _check(lease, base, masks)
    leave.set()
    rewriting.join(30)
    assert sorted(pool.resident()) == ["t0", "t1"]


def _wait_for(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_acquire_waiting_when_the_pool_closes_gets_input_error():
    pool, _, masks, _ = _setup(1)
    held = pool.acquire("t0", _zeros(pool, masks, "t0"))  # the only buffer: the next acquire waits
    errors: list[BaseException] = []

    def waiter():
        try:
            pool.release(pool.acquire("t1", _zeros(pool, masks, "t1")))
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    blocked = threading.Thread(target=waiter)
    blocked.start()
    _wait_for(lambda: pool.stats.waits >= 1)
    closer = threading.Thread(target=pool.close)  # waits for `held`, but wakes the waiter at once
    closer.start()
    blocked.join(30)
    alive = blocked.is_alive()
    pool.release(held)
    closer.join(30)
    blocked.join(30)
    assert not alive, "acquire kept waiting on a closed pool"
    assert not closer.is_alive() and not blocked.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], InputError) and "closed" in str(errors[0]), errors


def test_acquire_after_close_is_an_input_error_and_capacity_is_checked():
    pool, _, masks, _ = _setup(1)
    pool.close()
    with pytest.raises(InputError, match="closed"):
        pool.acquire("t0", _zeros(pool, masks, "t0"))
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


def test_a_decode_failing_midway_resets_the_buffer_to_the_base_values():
    """Zero indices may be decoded lazily, tensor by tensor, during the rewrite: a failure half-way
    leaves the buffer holding the plain base values, never a mix of two tasks."""
    pool, base, masks, _ = _setup(1)
    with _lease(pool, masks, "t0"):
        pass
    good = _zeros(pool, masks, "t1")()

    class Failing(dict):
        def __getitem__(self, key):
            if key == "c":
                raise ArtifactError("t1: mask 'c' is damaged")
            return good[key]

    with pytest.raises(ArtifactError, match="damaged"):
        pool.acquire("t1", lambda: Failing(good))
    assert pool.resident() == []
    with pool.lease(BASE, None) as lease:
        for key, array in lease.arrays.items():
            np.testing.assert_array_equal(array, base[key])
    with _lease(pool, masks, "t1") as lease:
        _check(lease, base, masks)
