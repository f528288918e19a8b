"""Reading a task for serving: its head, and its masks kept encoded until they are needed.

A .rmtask is checksum-verified and fingerprint-checked like `TaskPack.load` (`read_compact`),
and its mask blobs are kept as stored: a ViT-B/16 task then costs its file's size. When a
task is switched to, each blob is decoded straight to the sorted flat indices of its
zeros (`decode_zeros`, via `masks.decode_zero_indices`), never to a dense bool mask.
numpy only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping

import numpy as np

from rmt_deploy.artifacts.fingerprint import short
from rmt_deploy.artifacts.heads import ZEROSHOT, Cache, HeadMath, head_nbytes
from rmt_deploy.artifacts.integrity import FileRecord
from rmt_deploy.artifacts.masks import decode_zero_indices, encode_mask, mask_stats
from rmt_deploy.artifacts.task_file import TaskPack, check_task_name, read_encoded
from rmt_deploy.errors import ArtifactError, IncompatibleBaseError, RmtError

if TYPE_CHECKING:
    from rmt_deploy.runtime.buffer_pool import ZeroSet


@dataclass(frozen=True)
class TaskHead:
    """What a task adds on top of the shared embedding: class names, head of its kind, logit scale."""

    name: str
    class_names: tuple[str, ...]
    head: np.ndarray  # float32 [C, D], L2-normalised rows: class prompts' (or CoOp prompts') text features
    logit_scale: float
    kind: str = ZEROSHOT  # rmt_deploy.artifacts.heads.HEAD_KINDS
    cache: Cache | None = None  # tip-adapter kinds
    _math: HeadMath | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self.cache is None:  # a text head's prepared form is a view of it: kept, costs nothing
            object.__setattr__(self, "_math", HeadMath(self.head, self.logit_scale))

    @property
    def nbytes(self) -> int:
        """Bytes of the head as stored (text features plus any cache)."""
        return head_nbytes(self.head, self.cache)

    def prepared(self) -> HeadMath:
        """The head's logits math with its constants in float32. A cache head's (its keys in float32,
        twice their stored bytes, and one-hot values) is built anew on each call: a caller serving the
        task keeps it while the task is in use, so thousands of stored tasks do not each hold one."""
        return self._math if self._math is not None else HeadMath(self.head, self.logit_scale, self.cache)


def head_of(name: str, class_names: tuple[str, ...], head: np.ndarray, logit_scale: float,
            kind: str = ZEROSHOT, cache: Cache | None = None) -> TaskHead:
    """The serving head of a task, built from its pack's head kind."""
    return TaskHead(name, tuple(class_names), head, float(logit_scale), kind, cache)


@dataclass(frozen=True)
class CompactTask:
    """A verified task as the store keeps it: its head and its encoded masks (open_clip name -> blob)."""

    head: TaskHead
    blobs: dict[str, bytes]

    @property
    def nbytes(self) -> int:
        """Bytes held: the encoded masks and the head's tensors (a Tip-Adapter cache included)."""
        return sum(len(b) for b in self.blobs.values()) + self.head.nbytes


@dataclass(frozen=True)
class ServingTask:
    head: TaskHead
    zeros: dict[str, np.ndarray]  # open_clip tensor name -> sorted flat zero indices


def read_task(source: str | os.PathLike | TaskPack, fingerprint: str,
              shapes: Mapping[str, tuple[int, ...]], embed_dim: int,
              record: FileRecord | None = None, expected_name: str | None = None,
              quick_gelu: bool | None = None) -> ServingTask:
    """`read_compact`, then every mask decoded to its zero indices."""
    task = read_compact(source, fingerprint, shapes, embed_dim, record, expected_name, quick_gelu)
    return ServingTask(task.head, decode_zeros(task.blobs, shapes))


def decode_zeros(blobs: Mapping[str, bytes], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Sorted flat int64 zero indices of each mask, each blob checked to declare its tensor's shape."""
    return {name: decode_zero_indices(blob, shapes[name])[1] for name, blob in blobs.items()}


class LazyZeros(Mapping[str, "ZeroSet"]):
    """A task's ZeroSets (rmt_deploy.runtime.buffer_pool) per stored key, each decoded at its first access
    and kept.

    The pool rewrites a buffer tensor by tensor on its worker threads: decoding inside that
    loop overlaps decoding with rewriting. `nbytes` (what the decoded sets take) is known
    from the blob headers before anything is decoded: zeros x `bytes_per_zero` of each key
    (an index and a base value). The headers are range-checked here; each blob's CRC when it is
    decoded."""

    def __init__(self, blobs: Mapping[str, bytes], decoders: Mapping[str, Callable[[bytes], "ZeroSet"]],
                 sources: Mapping[str, str], bytes_per_zero: Mapping[str, int]):
        self._blobs, self._decoders, self._sources = blobs, decoders, sources  # key -> open_clip tensor name
        self._done: dict[str, ZeroSet] = {}
        self.nbytes = sum(mask_stats(blobs[sources[key]], check_crc=False).zeros * bytes_per_zero[key]
                          for key in sources)

    def __getitem__(self, key: str) -> "ZeroSet":
        found = self._done.get(key)
        if found is None:
            found = self._decoders[key](self._blobs[self._sources[key]])
            self._done[key] = found
        return found

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


def read_compact(source: str | os.PathLike | TaskPack, fingerprint: str,
                 shapes: Mapping[str, tuple[int, ...]], embed_dim: int,
                 record: FileRecord | None = None, expected_name: str | None = None,
                 quick_gelu: bool | None = None) -> CompactTask:
    """Read a task from a .rmtask path (or an in-memory TaskPack) for a base with these tensors.

    A file is read once, checked against `record` (the bundle's size and sha256) and `expected_name`
    when given; its base fingerprint, activation (`quick_gelu`, when given) and mask shapes must be
    the base's. Masks stay encoded."""
    if isinstance(source, TaskPack):
        source.check_base(fingerprint)
        head = head_of(source.name, tuple(source.class_names), source.head, source.logit_scale,
                       source.head_kind, source.cache)
        where = f"task pack {source.name!r}"
        _check_activation(where, source.quick_gelu, quick_gelu)
        _check_layout(where, head, {n: tuple(m.shape) for n, m in source.masks.items()}, shapes, embed_dim)
        return CompactTask(head, {n: encode_mask(m) for n, m in source.masks.items()})
    path = Path(source)
    try:
        return _read_file(path, fingerprint, shapes, embed_dim, record, expected_name, quick_gelu)
    except RmtError as exc:
        if isinstance(exc, IncompatibleBaseError) or str(path) in str(exc):
            raise
        raise ArtifactError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path}: task file is incomplete or malformed ({type(exc).__name__}: {exc})") from None


def _read_file(path: Path, fingerprint: str, shapes: Mapping[str, tuple[int, ...]], embed_dim: int,
               record: FileRecord | None, expected_name: str | None, quick_gelu: bool | None) -> CompactTask:
    encoded = read_encoded(path, record, expected_name)
    meta = encoded.meta
    if encoded.base_fingerprint != fingerprint:
        raise IncompatibleBaseError(
            f"task '{encoded.name}' ({path}) was trained on base {short(encoded.base_fingerprint)} "
            f"({meta.get('model_name')}), not on this bundle's base {short(fingerprint)}: "
            "retrain the task on this base or load the bundle it was trained on"
        )
    head = head_of(check_task_name(encoded.name), tuple(meta["class_names"]), encoded.head,
                   float(meta["logit_scale"]), encoded.head_kind, encoded.cache)
    _check_activation(f"task '{encoded.name}' ({path})", bool(meta.get("quick_gelu", False)), quick_gelu)
    _check_layout(str(path), head, encoded.mask_shapes, shapes, embed_dim)  # before anything is decoded
    return CompactTask(head, encoded.blobs)


def _check_activation(where: str, task_quick_gelu: bool, base_quick_gelu: bool | None) -> None:
    if base_quick_gelu is not None and bool(task_quick_gelu) != bool(base_quick_gelu):
        raise IncompatibleBaseError(
            f"{where} was trained with quick_gelu={bool(task_quick_gelu)}, this bundle's base runs with "
            f"quick_gelu={bool(base_quick_gelu)}: retrain the task on this base or load the bundle it was "
            "trained on")


def _check_layout(where: str, head: TaskHead, mask_shapes: Mapping[str, tuple[int, ...]],
                  shapes: Mapping[str, tuple[int, ...]], embed_dim: int) -> None:
    if set(mask_shapes) != set(shapes):
        missing, extra = sorted(set(shapes) - set(mask_shapes)), sorted(set(mask_shapes) - set(shapes))
        raise IncompatibleBaseError(
            f"{where} masks other tensors than this bundle (missing: {missing[:3]}, extra: {extra[:3]}); "
            "retrain the task on this base"
        )
    if head.head.ndim != 2 or head.head.shape != (len(head.class_names), embed_dim):
        raise ArtifactError(f"{where}: head shape {head.head.shape} is not "
                            f"[{len(head.class_names)} classes, {embed_dim}]")
    if head.cache is not None and head.cache.keys.shape[1] != embed_dim:
        raise ArtifactError(f"{where}: tip-adapter cache keys are {list(head.cache.keys.shape)}, not "
                            f"[keys, {embed_dim}]: rebuild the cache on this base")
    for name, shape in mask_shapes.items():
        if tuple(shape) != tuple(shapes[name]):
            raise IncompatibleBaseError(f"{where}: mask {name!r} has shape {list(shape)}, this bundle's "
                                        f"tensor is {list(shapes[name])}; retrain the task on this base")
