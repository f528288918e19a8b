"""Constant sessions: a resident task's own ONNX Runtime session, with its masked weights as constants.

base.onnx takes the masked weights as graph inputs, so ONNX Runtime neither prepacks them (MatMul,
Gemm) nor moves the convolutions using them into its NCHWc layout; a small tower pays for that
(MobileCLIP2-S0: 1.08x the folded model's run). The bundle's constant graph (base_constant.onnx) holds
those weights as initializers stored nowhere; a constant session is made on it with a pool slot's own
buffers handed over (SessionOptions.add_external_initializers: read in place, not copied), on a background
thread, while runs go on through the fed session. The slot is pinned while the session is made (ONNX
Runtime prepacks from the buffers then), and the session serves only the slot contents (generation) it
was made over: once the slot is rewritten, its next run drops it. A session is asked for at the
ASK_AFTER_USES-th prediction over the same slot contents, so a task served once and evicted (round-robin over
more tasks than buffers, uncached switches) costs no session it would never use. At most `limit` sessions
are held: each costs about one to two models' weights of memory (ONNX Runtime's own copy of the unmasked
weights and its prepacked copies), so by default only the first task to reach ASK_AFTER_USES gets one; a
session goes when its slot is rewritten, and the next task to reach ASK_AFTER_USES takes its place.

The graph file is read when a session is made, checked against the manifest's record first: a file that
changed after load, or any failure to make a session, turns constant sessions off with one warning, and
the fed session answers, as loaded.
"""
from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rmt_deploy.artifacts.integrity import FileRecord, read_verified
from rmt_deploy.errors import InputError
from rmt_deploy.runtime.buffer_pool import BASE, Lease, TaskPool

MAX_GRAPH_BYTES = 1 << 31  # protobuf's limit: a larger constant graph is never written
ASK_AFTER_USES = 32  # leases (predictions) of one slot's contents before its session is asked for: making one
# costs about 30 of the runs it speeds up by 8% (MobileCLIP2-S0: 74 ms against 2.5 ms saved a run), so a task
# that stays resident for only a few predictions (round-robin over more tasks than buffers) is not worth one
DEFAULT_LIMIT = 1  # constant sessions an engine holds unless told otherwise (the hot task's)


def session_limit(value: object) -> int:
    """Engine.load's `constant_sessions` as a number of sessions: an int >= 0, True (DEFAULT_LIMIT) or False (0)."""
    if isinstance(value, bool):
        return DEFAULT_LIMIT if value else 0
    if not isinstance(value, int) or value < 0:
        raise InputError(f"constant_sessions={value!r} must be an integer >= 0 (0 turns them off; default "
                         f"{DEFAULT_LIMIT}, at most one per resident task is used)")
    return value


class ConstantSessionWarning(UserWarning):
    """Constant sessions were turned off; the engine answers through the fed session."""


class ConstantSessions:
    """Per pool slot, a session on the constant graph over that slot's buffers, made in the background."""

    def __init__(self, graph: Path, record: FileRecord | None, make: Callable[[bytes, dict[str, np.ndarray]], Any],
                 pool: TaskPool, limit: int):
        """`make(graph_bytes, arrays)`: a checked session whose supplied initializers are `arrays`; at most
        `limit` sessions at a time."""
        self._graph, self._record, self._make, self._pool = graph, record, make, pool
        self.limit = limit
        self._cond = threading.Condition()
        self._ready: dict[int, tuple[int, Any]] = {}   # slot -> (generation, session)
        self._queued: dict[int, int] = {}              # slot -> generation to make a session for
        self._making: tuple[int, int] | None = None    # (slot, generation) of the session being made
        self._uses: dict[int, tuple[Lease, int]] = {}   # slot -> (its last lease run, leases of its contents)
        self._off: str | None = None                   # why constant sessions are off, once they are
        self._closed = False
        self._worker: threading.Thread | None = None
        self.made = 0

    def session(self, lease: Lease) -> Any | None:
        """The session over the lease's slot contents for a run, if made; else None (and at that contents'
        ASK_AFTER_USES-th lease, one is asked for)."""
        with self._cond:
            held = self._ready.get(lease.slot)
            if held is not None and held[0] == lease.generation:
                return held[1]
            if held is not None:
                del self._ready[lease.slot]  # made over contents the slot no longer holds
            last, uses = self._uses.get(lease.slot, (None, 0))
            if last is not lease:  # one lease runs each part of a batch split at max_batch: one use
                uses = uses + 1 if last is not None and last.generation == lease.generation else 1
                self._uses[lease.slot] = (lease, uses)
            if uses >= ASK_AFTER_USES and self._off is None and not self._closed and lease.task != BASE \
                    and self._queued.get(lease.slot) != lease.generation \
                    and self._making != (lease.slot, lease.generation) and self._room():
                self._queued[lease.slot] = lease.generation
                self._start()
                self._cond.notify_all()
        return None

    def _room(self) -> bool:
        """Whether one more session may be asked for (under the lock): sessions over contents their slot no
        longer holds are dropped first."""
        def held() -> int:
            return len(self._ready) + len(self._queued) + (self._making is not None)

        if held() >= self.limit:
            for slot, (generation, _) in list(self._ready.items()):
                if not self._pool.still_holds(slot, generation):
                    del self._ready[slot]
        return held() < self.limit

    @property
    def off(self) -> str | None:
        """Why constant sessions were turned off, or None."""
        return self._off

    def ready_count(self) -> int:
        with self._cond:
            return len(self._ready)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until no session is asked for or being made; False if `timeout` seconds passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._closed or not (self._queued or self._making), timeout)

    def close(self) -> None:
        """Stop the worker (after the session it is making) and drop every session."""
        with self._cond:
            self._closed = True
            self._queued.clear()
            self._cond.notify_all()
            worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join()
        with self._cond:
            self._ready.clear()

    # ------------------------------------------------------------ the worker

    def _start(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="rmt-constant-sessions", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._queued)
                if self._closed:
                    return
                slot = next(iter(self._queued))
                self._making = (slot, self._queued.pop(slot))
            try:
                self._build(*self._making)
            finally:
                with self._cond:
                    self._making = None
                    self._cond.notify_all()

    def _build(self, slot: int, generation: int) -> None:
        lease = self._pool.pin(slot, generation)
        if lease is None:
            return  # rewritten since it was asked for, or the engine is closing
        try:
            session = self._make(read_verified(self._graph, self._record, MAX_GRAPH_BYTES), dict(lease.arrays))
        except Exception as exc:  # noqa: BLE001 - any failure only costs speed: the fed session answers
            self._turn_off(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc) else ''}")
            return
        finally:
            self._pool.release(lease)
        with self._cond:
            if not self._closed:
                self._ready[slot] = (generation, session)
                self.made += 1

    def _turn_off(self, why: str) -> None:
        with self._cond:
            self._off = why
            self._queued.clear()
        warnings.warn(f"{self._graph}: constant sessions are off ({why}); every task keeps answering through "
                      "the shared graph, its weights fed (a little slower on small towers)", ConstantSessionWarning,
                      stacklevel=2)
