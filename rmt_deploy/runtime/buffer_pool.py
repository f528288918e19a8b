"""TaskPool: a small LRU of dense masked-weight buffers, rewritten in place on a miss.

A buffer holding task A becomes task B by writing the base values back at A's zero
indices and zeroing B's: two scatters touching a few percent of the memory. A task
comes as a ZeroSet per tensor: its zero indices, and the base values there once a
rewrite has read them from the buffer just before zeroing them (the buffer then holds
exactly the base). The caller's warm tier keeps the ZeroSets, so switching back to a
task is two scatters and no gather. No pristine copy of the base is kept and no file
stays mapped: a new buffer is a copy of a ready one with that one's zeros given their
base values back, and a rewrite that fails half-way puts back, tensor by tensor, the base
values of whichever zeros it holds. So after `fill_base` the pool never reads the bundle
again: a base weights file changed, truncated or deleted under a live engine changes
nothing (issue #24; benchmarks/live_files.py measures what a mapping or a private copy cost).
A buffer in use by a caller (leased) is never rewritten, so every run sees exactly one
task's weights. A rewrite runs outside the pool's lock: hits on other buffers go on
meanwhile. numpy only.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from rmt_deploy.errors import InputError, InternalError

BASE = "<base>"  # pseudo-task: the unmasked base values


@dataclass
class ZeroSet:
    """Where a task zeroes one stored tensor: sorted flat indices (stored layout, intp), the tensor's
    dtype and, once a rewrite has read them, the base values there (`TaskPool.zero_set` builds it)."""

    indices: np.ndarray
    dtype: np.dtype
    base_values: np.ndarray | None = None

    @staticmethod
    def bytes_per_zero(dtype: np.dtype) -> int:
        """What a ZeroSet holds per zero once its base values are read: an index and a value."""
        return np.dtype(np.intp).itemsize + np.dtype(dtype).itemsize

    @property
    def nbytes(self) -> int:
        """Bytes held once the base values are read."""
        return self.indices.size * self.bytes_per_zero(self.dtype)


Zeros = Mapping[str, ZeroSet]  # stored key -> the task's ZeroSet for that tensor
NO_ZEROS: Zeros = {}


def index_array(idx: np.ndarray) -> np.ndarray:
    """Flat indices as numpy's native index type (intp): scattering with int32 indices casts
    them on every call and measured twice as slow, which the uncached switch cannot afford."""
    return np.ascontiguousarray(idx, dtype=np.intp)


@dataclass(frozen=True)
class TensorSpec:
    """A masked tensor as a backend stores it: key (graph input, parameter or TensorRT weights
    name), stored shape and dtype, the open_clip tensor name, and `perm` when the stored
    layout is the open_clip tensor transposed by that permutation."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    tensor: str
    perm: tuple[int, ...] | None = None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def stored_indices(self, idx: np.ndarray) -> np.ndarray:
        """Sorted flat indices in the stored layout of flat indices into the open_clip tensor."""
        if self.perm is None:
            return idx
        source_shape = [0] * len(self.shape)
        for axis, p in enumerate(self.perm):
            source_shape[p] = self.shape[axis]
        coords = np.unravel_index(idx, source_shape)
        moved = np.ravel_multi_index(tuple(coords[p] for p in self.perm), self.shape)
        moved.sort()
        return moved


@dataclass
class _Slot:
    index: int
    arrays: dict[str, np.ndarray]
    task: str
    zeros: Zeros = field(default_factory=dict)  # what is zeroed in `arrays` now, with the base values there
    ready: bool = True                           # False while a rewrite to `task` is under way
    refs: int = 0
    generation: int = 0
    last_used: int = 0


@dataclass(frozen=True)
class Lease:
    """A pinned buffer holding one task's dense masked weights; release it after the run."""

    task: str
    slot: int
    generation: int  # changes whenever the slot's contents are rewritten
    arrays: Mapping[str, np.ndarray]


@dataclass
class PoolStats:
    hits: int = 0
    misses: int = 0
    allocations: int = 0
    waits: int = 0


class TaskPool:
    """LRU pool of `capacity` dense buffers; tasks come in as zero indices on a miss. Thread-safe."""

    def __init__(self, specs: list[TensorSpec], fill_base: Callable[[dict[str, np.ndarray]], object],
                 capacity: int = 2, workers: int | None = None):
        """`fill_base(arrays)` writes the base values into the first buffer (key -> empty array); it is
        the only read of the base the pool makes."""
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise InputError(f"cache_tasks={capacity!r} must be an integer >= 1")
        self.specs = {s.key: s for s in specs}
        self.capacity = capacity
        self.stats = PoolStats()
        self._slots: list[_Slot] = []
        self._clock = 0
        self._closed = False
        self._cond = threading.Condition()
        # numpy scatters release the GIL, so tensors are rewritten on a few threads at once
        workers = min(4, os.cpu_count() or 1) if workers is None else workers
        self._executor = ThreadPoolExecutor(workers, "rmt-pool") if workers > 1 and len(specs) > 1 else None
        arrays = {spec.key: np.empty(spec.shape, spec.dtype) for spec in specs}
        fill_base(arrays)  # first buffer: the base values, read straight into place
        self._slots.append(_Slot(0, arrays, BASE))

    def resident(self) -> list[str]:
        """Tasks currently materialised in a buffer, most recently used first."""
        with self._cond:
            return [s.task for s in sorted(self._slots, key=lambda s: -s.last_used) if s.task != BASE and s.ready]

    def holds(self, task: str) -> bool:
        with self._cond:
            return any(s.task == task and s.ready for s in self._slots)

    def zero_set(self, key: str, indices: np.ndarray) -> ZeroSet:
        """A task's ZeroSet for stored tensor `key` from its sorted flat zero indices (stored layout)."""
        idx = index_array(indices)
        spec = self.specs.get(key)
        if spec is None or not _sorted_in_range(idx, spec.size):
            raise InternalError(f"zero indices of {key!r} are not sorted in-range flat indices of a pool tensor")
        return ZeroSet(idx, spec.dtype)

    # ------------------------------------------------------------ leasing

    def acquire(self, task: str, zeros: Callable[[], Zeros]) -> Lease:
        """Pin a buffer holding `task`; on a miss, rewrite the least recently used free buffer with
        the ZeroSets `zeros()` returns (called outside the lock; its errors reach the caller)."""
        with self._cond:
            while True:
                self._check_open()
                slot = next((s for s in self._slots if s.task == task), None)
                if slot is not None and slot.ready:
                    self.stats.hits += 1
                    return self._pin(slot)
                victim = None if slot is not None else self._victim()  # a rewrite to `task` is under way
                if victim is not None:
                    break
                self.stats.waits += 1
                self._cond.wait()
            self.stats.misses += 1
            old_task, old_zeros = self._claim(victim, task)
        try:
            new_zeros = NO_ZEROS if task == BASE else zeros()
            if task != BASE and set(new_zeros) != set(self.specs):
                raise InternalError(f"task {task!r} masks {sorted(new_zeros)[:3]}, the pool holds "
                                    f"{sorted(self.specs)[:3]}")
        except BaseException:
            self._finish(victim, old_task, old_zeros)  # nothing was written
            raise
        self._rewrite_or_reset(victim, old_zeros, new_zeros)
        with self._cond:
            self._finish(victim, task, new_zeros, bump=False)
            return self._pin(victim)

    def pin(self, slot: int, generation: int) -> Lease | None:
        """Pin buffer `slot` while it still holds contents `generation` (background work on a resident task,
        e.g. a session made over it); None if it was rewritten since, or the pool is closed. Not a use: the
        LRU order stays."""
        with self._cond:
            held = self._slots[slot] if not self._closed and 0 <= slot < len(self._slots) else None
            if held is None or held.generation != generation or not held.ready:
                return None
            held.refs += 1
            return Lease(held.task, held.index, held.generation, held.arrays)

    def still_holds(self, slot: int, generation: int) -> bool:
        """Whether buffer `slot` still holds contents `generation` (not rewritten since)."""
        with self._cond:
            held = self._slots[slot] if 0 <= slot < len(self._slots) else None
            return held is not None and held.generation == generation and held.ready

    def release(self, lease: Lease) -> None:
        with self._cond:
            slot = self._slots[lease.slot]
            if slot.refs <= 0 or slot.generation != lease.generation:
                raise InternalError(f"release of a lease the pool does not hold: {lease}")
            slot.refs -= 1
            self._cond.notify_all()

    def lease(self, task: str, zeros: Callable[[], Zeros]) -> "_LeaseContext":
        return _LeaseContext(self, task, zeros)

    def evict(self, task: str) -> bool:
        """Wait until no run uses `task`, then give its buffer back the base values (and the buffer
        to the next miss). Returns whether a buffer held it. The caller stops new leases of it first."""
        with self._cond:
            while True:
                self._check_open()
                slot = next((s for s in self._slots if s.task == task), None)
                if slot is None:
                    return False
                if slot.ready and slot.refs == 0:
                    break
                self._cond.wait()
            _, old_zeros = self._claim(slot, BASE)
        self._rewrite_or_reset(slot, old_zeros, NO_ZEROS)
        self._finish(slot, BASE, NO_ZEROS)
        return True

    def close(self) -> None:
        """Refuse new leases, wait for the ones in use, then drop the buffers."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()  # waiters in acquire() wake up and see the pool closed
            while any(s.refs for s in self._slots):
                self._cond.wait()
            self._slots = []
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    # ------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._closed:
            raise InputError("this engine is closed; load a new one with Engine.load(...)")

    def _checked(self, key: str, zeros: ZeroSet) -> ZeroSet:
        spec = self.specs[key]
        values = getattr(zeros, "base_values", None)
        if not isinstance(zeros, ZeroSet) or zeros.indices.dtype != np.intp or zeros.dtype != spec.dtype \
                or not _sorted_in_range(zeros.indices, spec.size) \
                or values is not None and (values.shape != zeros.indices.shape or values.dtype != spec.dtype):
            raise InternalError(f"zeros of {key!r} are not a ZeroSet of sorted in-range intp indices for a "
                                f"{spec.dtype} tensor (build it with TaskPool.zero_set)")
        return zeros

    def _pin(self, slot: _Slot) -> Lease:
        self._clock += 1
        slot.refs += 1
        slot.last_used = self._clock
        return Lease(slot.task, slot.index, slot.generation, slot.arrays)

    def _victim(self) -> _Slot | None:
        free = [s for s in self._slots if s.refs == 0 and s.ready]
        base = next((s for s in free if s.task == BASE), None)
        if base is not None:
            return base
        if len(self._slots) < self.capacity:
            return self._allocate()
        return min(free, key=lambda s: s.last_used) if free else None

    def _allocate(self) -> _Slot | None:
        """A new buffer holding the base values: a copy of a ready buffer (call under the lock: its
        contents cannot change then) with that buffer's zeros given their base values back; None
        while every buffer is being rewritten."""
        source = next((s for s in self._slots if s.ready and s.task == BASE), None) \
            or next((s for s in self._slots if s.ready), None)
        if source is None:
            return None
        arrays = {k: np.array(a) for k, a in source.arrays.items()}
        for key, held in source.zeros.items():
            if held.indices.size:
                arrays[key].reshape(-1)[held.indices] = held.base_values
        slot = _Slot(len(self._slots), arrays, BASE)
        self._slots.append(slot)
        self.stats.allocations += 1
        return slot

    def _rewrite(self, arrays: dict[str, np.ndarray], old: Zeros, new: Zeros,
                 done: dict[str, ZeroSet | None]) -> None:
        """Give the old zeros their base values back, then zero the new ones, tensor by tensor; the
        base values at new zeros not read yet are read just before (the lines about to be written).
        `done` gets each tensor whose old zeros are restored: key -> the new ZeroSet written (or None)."""

        def rewrite(key: str) -> None:
            flat = arrays[key].reshape(-1)
            zeros = self._checked(key, new[key]) if key in new else None  # may decode here, on this worker
            held = old.get(key)
            if held is not None and held.indices.size:
                flat[held.indices] = held.base_values
            done[key] = None  # the tensor holds its base values now
            if zeros is not None:
                if zeros.base_values is None:
                    zeros.base_values = flat[zeros.indices]
                done[key] = zeros
                flat[zeros.indices] = 0

        if self._executor is None:
            for key in arrays:
                rewrite(key)
            return
        futures = [self._executor.submit(rewrite, key) for key in arrays]
        wait(futures)  # every worker has stopped writing before a failure is handled
        for future in futures:
            future.result()

    def _rewrite_or_reset(self, slot: _Slot, old: Zeros, new: Zeros) -> None:
        """`_rewrite`; if it fails half-way, each tensor gets its base values back from the zeros it
        holds then (the old task's where it was not rewritten yet, the new task's where it was)."""
        done: dict[str, ZeroSet | None] = {}
        try:
            self._rewrite(slot.arrays, old, new, done)
        except BaseException:
            for key, array in slot.arrays.items():
                held = done[key] if key in done else old.get(key)
                if held is not None and held.indices.size:
                    array.reshape(-1)[held.indices] = held.base_values
            self._finish(slot, BASE, NO_ZEROS)
            raise

    @staticmethod
    def _claim(slot: _Slot, task: str) -> tuple[str, Zeros]:
        """Mark a free slot as being rewritten to `task` by this thread (call under the lock); returns
        what it held."""
        held = (slot.task, slot.zeros)
        slot.task, slot.ready, slot.refs = task, False, 1
        slot.generation += 1
        return held

    def _finish(self, slot: _Slot, task: str, zeros: Zeros, bump: bool = True) -> None:
        """Make a slot being rewritten ready again, holding `task`, and wake the waiters."""
        with self._cond:
            slot.task, slot.zeros, slot.ready, slot.refs = task, zeros, True, 0
            if bump:
                slot.generation += 1
            self._cond.notify_all()


def _sorted_in_range(idx: np.ndarray, size: int) -> bool:
    """One-dimensional with its first and last entries in [0, size) (sorted by construction)."""
    return idx.ndim == 1 and (not idx.size or 0 <= idx[0] <= idx[-1] < size)


class _LeaseContext:
    def __init__(self, pool: TaskPool, task: str, zeros: Callable[[], Zeros]):
        self.pool, self.task, self.zeros, self.lease = pool, task, zeros, None

    def __enter__(self) -> Lease:
        self.lease = self.pool.acquire(self.task, self.zeros)
        return self.lease

    def __exit__(self, *exc) -> None:
        self.pool.release(self.lease)
