"""TaskStore: thousands of tasks on one base, each held in the cheapest tier it can be served from.

Tiers, from cheapest to fastest to switch to:
- disk: listed by name, not read (a bundle's tasks right after `Engine.load`);
- cold: read and verified once, kept as its encoded masks plus its head (about its file's size);
- warm: its zero indices decoded with the base values there, ready to rewrite a buffer (12 bytes
  per zero of an fp32 base), kept within a byte budget (`warm_bytes`), least recently used first out;
- resident: in one of the pool's dense buffers (the TaskPool; `cache_tasks` of them).
A task's integrity is checked when it is first read, before its first use. numpy only.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping

from rmt_deploy.errors import InputError, UnknownTaskError
from rmt_deploy.runtime.task_reader import CompactTask, TaskHead

if TYPE_CHECKING:
    from rmt_deploy.runtime.buffer_pool import ZeroSet

DISK, COLD, WARM, RESIDENT = "disk", "cold", "warm", "resident"
TIERS = (DISK, COLD, WARM, RESIDENT)
DEFAULT_WARM_BYTES = 256 << 20  # about 30 ViT-B/16 fp32 tasks at 2.5% zeros

Reader = Callable[[], CompactTask]
DecodedZeros = Mapping[str, "ZeroSet"]  # stored key -> the task's ZeroSet for that tensor
Decoder = Callable[[CompactTask], DecodedZeros]


@dataclass
class _Entry:
    read: Reader
    compact: CompactTask | None = None
    zeros: DecodedZeros | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)  # one reader/decoder per task at a time



@dataclass(frozen=True)
class StoreStats:
    """How many tasks each tier holds and the bytes the cold and warm forms take."""

    tasks: int
    disk: int
    cold: int
    warm: int
    cold_bytes: int
    warm_bytes: int
    warm_budget: int


def zeros_nbytes(zeros: DecodedZeros) -> int:
    """Bytes of a task's decoded zeros (ZeroSets; known before decoding for a LazyZeros)."""
    known = getattr(zeros, "nbytes", None)
    return int(known) if known is not None else sum(a.nbytes for a in zeros.values())


def check_warm_bytes(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InputError(f"warm_bytes={value!r} must be an integer >= 0 (bytes of decoded tasks kept ready; "
                         f"default {DEFAULT_WARM_BYTES})")
    return value


class TaskStore:
    """Tasks by name with lazy reading, a warm LRU under a byte budget, and hot add/remove. Thread-safe."""

    def __init__(self, decode: Decoder, warm_bytes: int = DEFAULT_WARM_BYTES):
        self._decode = decode
        self.warm_budget = check_warm_bytes(warm_bytes)
        self._entries: dict[str, _Entry] = {}
        self._warm: OrderedDict[str, int] = OrderedDict()  # name -> bytes, least recently used first
        self._warm_total = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------ membership

    @property
    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, name: str, read: Reader, compact: CompactTask | None = None) -> None:
        """List a task: on disk (`read` is called at its first use) or, with `compact`, already read."""
        with self._lock:
            if name in self._entries:
                raise InputError(f"task {name!r} is already loaded; give the new version another name")
            self._entries[name] = _Entry(read, compact)

    def remove(self, name: str) -> None:
        with self._lock:
            if self._entries.pop(self._known(name), None) is not None:
                self._warm_total -= self._warm.pop(name, 0)

    # ------------------------------------------------------------ tiers

    def head(self, name: str) -> TaskHead:
        """The task's head, reading and verifying the task file at its first use."""
        return self._compact(name).head

    def zeros(self, name: str) -> DecodedZeros:
        """The task's decoded zeros (decoded from its masks unless warm); marks it most recently used."""
        entry = self._entry(name)
        with entry.lock:
            zeros = entry.zeros
            if zeros is None:
                zeros = self._decode(self._compact_of(entry))
        with self._lock:
            if self._entries.get(name) is entry:
                self._keep_warm(name, entry, zeros)
        return zeros

    def tier(self, name: str) -> str:
        """disk, cold or warm (the pool knows whether a task is also resident)."""
        entry = self._entry(name)
        return WARM if entry.zeros is not None else COLD if entry.compact is not None else DISK

    def stats(self) -> StoreStats:
        with self._lock:
            entries = list(self._entries.values())
        cold = [e for e in entries if e.compact is not None]
        warm = sum(1 for e in entries if e.zeros is not None)
        return StoreStats(len(entries), len(entries) - len(cold), len(cold) - warm, warm,
                          sum(e.compact.nbytes for e in cold), self._warm_total, self.warm_budget)

    # ------------------------------------------------------------ internals

    def _known(self, name: str) -> str:
        if name not in self._entries:
            available = list(self._entries)
            shown = ", ".join(available[:20]) + (f", ... ({len(available)} in all)" if len(available) > 20 else "")
            raise UnknownTaskError(f"task {name!r} not loaded (available: {shown or 'none'})")
        return name

    def _entry(self, name: str) -> _Entry:
        with self._lock:
            return self._entries[self._known(name)]

    def _compact(self, name: str) -> CompactTask:
        return self._compact_of(self._entry(name))

    @staticmethod
    def _compact_of(entry: _Entry) -> CompactTask:
        if entry.compact is None:
            with entry.lock:  # concurrent first uses wait for one read; a failed read is retried next time
                if entry.compact is None:
                    entry.compact = entry.read()
        return entry.compact

    def _keep_warm(self, name: str, entry: _Entry, zeros: DecodedZeros) -> None:
        """Record `name` as most recently used; drop the least recently used warm tasks over the budget."""
        size = zeros_nbytes(zeros)
        if entry.zeros is None:
            if size > self.warm_budget:
                return
            entry.zeros = zeros
            self._warm[name] = size
            self._warm_total += size
        self._warm.move_to_end(name)
        while self._warm_total > self.warm_budget:
            victim, freed = self._warm.popitem(last=False)
            self._entries[victim].zeros = None
            self._warm_total -= freed
