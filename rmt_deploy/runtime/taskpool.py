"""TaskPool: a small LRU of dense masked-weight buffers, rewritten in place on a miss.

Each task is held compactly: per masked tensor, the sorted flat indices of its zeroed
weights (numpy's native intp) and the base values at those indices (a few
percent of the weights). No dense base copy is kept: a buffer holding task A becomes
task B by writing A's saved base values back and zeroing B's indices, which touches a
few percent of the memory.
A buffer in use by a caller (leased) is never rewritten, so every run sees exactly one
task's weights. numpy only.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from rmt_deploy.errors import InputError, InternalError, UnknownTaskError

BASE = "<base>"  # pseudo-task: the unmasked base values


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
class _TaskWeights:
    zeros: dict[str, np.ndarray]    # key -> sorted flat indices of zeroed weights (index_array)
    restore: dict[str, np.ndarray]  # key -> base values at those indices

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.zeros.values()) + sum(a.nbytes for a in self.restore.values())


@dataclass
class _Slot:
    index: int
    arrays: dict[str, np.ndarray]
    task: str
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
    """LRU pool of `capacity` dense buffers over compactly stored tasks; thread-safe."""

    def __init__(self, specs: list[TensorSpec], fill_base: Callable[[dict[str, np.ndarray]], object],
                 capacity: int = 2, workers: int | None = None):
        """`fill_base(arrays)` writes the base values into the first buffer (key -> empty array)."""
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise InputError(f"cache_tasks={capacity!r} must be an integer >= 1")
        self.specs = {s.key: s for s in specs}
        self.capacity = capacity
        self.stats = PoolStats()
        self._tasks: dict[str, _TaskWeights] = {BASE: _TaskWeights({}, {})}
        self._slots: list[_Slot] = []
        self._clock = 0
        self._closed = False
        self._cond = threading.Condition()
        # numpy scatters release the GIL: rewriting tensors on a few threads cuts a miss ~1.7x on 2 cores
        workers = min(4, os.cpu_count() or 1) if workers is None else workers
        self._executor = ThreadPoolExecutor(workers, "rmt-pool") if workers > 1 and len(specs) > 1 else None
        arrays = {spec.key: np.empty(spec.shape, spec.dtype) for spec in specs}
        fill_base(arrays)  # first buffer: the base values, read straight into place
        self._slots.append(_Slot(0, arrays, BASE))

    def base_arrays(self) -> dict[str, np.ndarray]:
        """The unmasked base values, while the first buffer still holds them (right after loading)."""
        with self._cond:
            slot = next((s for s in self._slots if s.task == BASE), None)
            if slot is None:
                raise InternalError("no buffer holds the base values any more")
            return dict(slot.arrays)

    # ------------------------------------------------------------ tasks

    @property
    def tasks(self) -> list[str]:
        return [t for t in self._tasks if t != BASE]

    def resident(self) -> list[str]:
        """Tasks currently materialised in a buffer, most recently used first."""
        with self._cond:
            return [s.task for s in sorted(self._slots, key=lambda s: -s.last_used) if s.task != BASE]

    def task_nbytes(self, task: str) -> int:
        return self._tasks[task].nbytes

    def add(self, task: str, zeros: Mapping[str, np.ndarray]) -> None:
        """Register a task by the sorted flat zero indices of each masked tensor."""
        if set(zeros) != set(self.specs):
            raise InputError(f"task {task!r} masks {sorted(zeros)}, the pool holds {sorted(self.specs)}")
        zeros = {key: index_array(idx) for key, idx in zeros.items()}
        with self._cond:
            self._check_open()
            if task in self._tasks:
                raise InputError(f"task {task!r} is already loaded; give the new version another name")
            source = self._slots[0]
            held = self._tasks[source.task]
            restore = {key: self._base_values(source, held, key, idx) for key, idx in zeros.items()}
            self._tasks[task] = _TaskWeights(zeros, restore)

    @staticmethod
    def _base_values(slot: _Slot, held: _TaskWeights, key: str, idx: np.ndarray) -> np.ndarray:
        """Base values at idx, read from a buffer holding task `held` (its zeros come from restore)."""
        values = slot.arrays[key].reshape(-1)[idx]
        held_idx = held.zeros.get(key)
        if held_idx is not None and held_idx.size and idx.size:
            pos = np.searchsorted(held_idx, idx)
            np.minimum(pos, held_idx.size - 1, out=pos)
            hit = held_idx[pos] == idx
            values[hit] = held.restore[key][pos[hit]]
        return values

    # ------------------------------------------------------------ leasing

    def acquire(self, task: str) -> Lease:
        """Pin a buffer holding `task`, rewriting the least recently used free one on a miss."""
        with self._cond:
            self._check_open()
            if task not in self._tasks:
                raise UnknownTaskError(f"task {task!r} not loaded (available: {', '.join(self.tasks) or 'none'})")
            while True:
                slot = next((s for s in self._slots if s.task == task), None)
                if slot is not None:
                    self.stats.hits += 1
                    return self._pin(slot)
                slot = self._victim()
                if slot is not None:
                    self.stats.misses += 1
                    self._switch(slot, task)
                    return self._pin(slot)
                self.stats.waits += 1
                self._cond.wait()
                self._check_open()  # close() may have dropped the buffers while this thread waited

    def release(self, lease: Lease) -> None:
        with self._cond:
            slot = self._slots[lease.slot]
            if slot.refs <= 0 or slot.generation != lease.generation:
                raise InternalError(f"release of a lease the pool does not hold: {lease}")
            slot.refs -= 1
            self._cond.notify_all()

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

    def _check_open(self) -> None:
        if self._closed:
            raise InputError("this engine is closed; load a new one with Engine.load(...)")

    def lease(self, task: str) -> "_LeaseContext":
        return _LeaseContext(self, task)

    def _pin(self, slot: _Slot) -> Lease:
        self._clock += 1
        slot.refs += 1
        slot.last_used = self._clock
        return Lease(slot.task, slot.index, slot.generation, slot.arrays)

    def _victim(self) -> _Slot | None:
        free = [s for s in self._slots if s.refs == 0]
        base = next((s for s in free if s.task == BASE), None)
        if base is not None:
            return base
        if len(self._slots) < self.capacity:
            return self._allocate()
        return min(free, key=lambda s: s.last_used) if free else None

    def _allocate(self) -> _Slot:
        """A new buffer, copied from an existing one (a memcpy, no file read)."""
        source = max(self._slots, key=lambda s: s.last_used)
        arrays = {k: a.copy() for k, a in source.arrays.items()}
        slot = _Slot(len(self._slots), arrays, source.task)
        self._slots.append(slot)
        self.stats.allocations += 1
        return slot

    def _switch(self, slot: _Slot, task: str) -> None:
        old, new = self._tasks[slot.task], self._tasks[task]

        def rewrite(key: str) -> None:
            flat = slot.arrays[key].reshape(-1)
            idx = old.zeros.get(key)
            if idx is not None:
                flat[idx] = old.restore[key]
            idx = new.zeros.get(key)
            if idx is not None:
                flat[idx] = 0

        if self._executor is None:
            for key in slot.arrays:
                rewrite(key)
        else:
            list(self._executor.map(rewrite, slot.arrays))
        slot.task = task
        slot.generation += 1


class _LeaseContext:
    def __init__(self, pool: TaskPool, task: str):
        self.pool, self.task, self.lease = pool, task, None

    def __enter__(self) -> Lease:
        self.lease = self.pool.acquire(self.task)
        return self.lease

    def __exit__(self, *exc) -> None:
        self.pool.release(self.lease)

