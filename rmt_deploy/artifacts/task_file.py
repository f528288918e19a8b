"""TaskPack: one task in one safetensors file (<task>.rmtask).

Tensors: `head` float32 [C, D] and one uint8 payload per masked tensor
(`mask/<tensor name>`, encoded by rmt_deploy.artifacts.masks); a Tip-Adapter head adds
`cache/keys` float16 [K, D] and `cache/labels` int64 [K]. Metadata: one JSON string
under the header key `rmt_deploy`. Loading never unpickles.

Version 1: the zero-shot text head only (what rmt-deploy wrote before task heads had kinds).
Version 2 adds `head` metadata {kind, and for a cache: alpha, beta}. A zeroshot pack is still
written as version 1, so runtimes that predate head kinds keep reading it; both versions load.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rmt_deploy.artifacts.fingerprint import short
from rmt_deploy.artifacts.heads import (
    CACHE_KINDS,
    ZEROSHOT,
    Cache,
    check_alpha_beta,
    check_cache_layout,
    check_kind,
    check_labels,
)
from rmt_deploy.artifacts.integrity import FileRecord, read_verified
from rmt_deploy.artifacts.masks import MAX_SIZE as MAX_MASK_ELEMENTS
from rmt_deploy.artifacts.masks import decode_mask, encode_mask
from rmt_deploy.artifacts.safetensors_header import load_bytes
from rmt_deploy.artifacts.staging import write_atomic
from rmt_deploy.errors import ArtifactError, IncompatibleBaseError, InputError, RmtError, check_format

FORMAT_TAG = "rmt-deploy.taskpack"
FORMAT_VERSION = 2  # the newest this code writes and reads
VERSIONS = (1, 2)
SUFFIX = ".rmtask"
METADATA_KEY = "rmt_deploy"
CHECKSUM_KEY = "rmt_deploy_sha256"
HEAD_KEY = "head"
MASK_PREFIX = "mask/"
CACHE_KEYS_KEY = "cache/keys"
CACHE_LABELS_KEY = "cache/labels"
MAX_TASK_FILE_BYTES = 1 << 30
_REQUIRED_META = ("name", "class_names", "base_fingerprint", "model_name", "logit_scale", "masked_tensors")
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_task_name(name: str) -> str:
    """Task names become file names: letters, digits, '_', '.', '-' only."""
    if not isinstance(name, str) or not _TASK_NAME.match(name):
        raise InputError(
            f"task name {name!r} is not valid: use 1-128 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass
class TaskPack:
    """A trained task: binary masks over base weights plus its class head."""

    name: str
    class_names: list[str]
    head: np.ndarray
    masks: dict[str, np.ndarray]
    base_fingerprint: str
    model_name: str
    logit_scale: float = 100.0
    template: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    quick_gelu: bool = False  # the base's activation: QuickGELU (OpenAI CLIP weights) or GELU
    head_kind: str = ZEROSHOT  # see rmt_deploy.artifacts.heads: zeroshot, coop, tip-adapter, tip-adapter-f
    cache: Cache | None = None  # Tip-Adapter's cache model (tip-adapter kinds only)

    def __post_init__(self) -> None:
        check_task_name(self.name)
        self.class_names = [str(c) for c in self.class_names]
        self.head = np.ascontiguousarray(self.head, dtype=np.float32)
        if self.head.ndim != 2 or self.head.shape[0] != len(self.class_names):
            raise InputError(
                f"head shape {self.head.shape} does not match {len(self.class_names)} class names "
                "(expected [classes, embed_dim])"
            )
        for tensor_name, keep in self.masks.items():
            if not isinstance(keep, np.ndarray) or keep.dtype != np.bool_:
                raise InputError(f"mask for {tensor_name!r} must be a bool numpy array")
        check_kind(self.head_kind)
        if (self.cache is not None) != (self.head_kind in CACHE_KINDS):
            raise InputError(f"head {self.head_kind!r} {'needs' if self.cache is None else 'takes no'} "
                             "tip-adapter cache: pass one exactly for the tip-adapter heads")
        if self.cache is not None:
            self.cache = Cache.build(self.cache.keys, self.cache.labels, self.cache.alpha, self.cache.beta,
                                     len(self.class_names), self.head.shape[1])

    @property
    def sparsity(self) -> float:
        """Fraction of masked entries that are zero (dropped weights)."""
        total = sum(int(m.size) for m in self.masks.values())
        zeros = sum(int(m.size - np.count_nonzero(m)) for m in self.masks.values())
        return zeros / total if total else 0.0

    def check_base(self, fingerprint: str) -> None:
        """Raise IncompatibleBaseError unless this pack was trained on that base."""
        if fingerprint != self.base_fingerprint:
            raise IncompatibleBaseError(
                f"task '{self.name}' was trained on base {short(self.base_fingerprint)} "
                f"({self.model_name}), not on this base {short(fingerprint)}: "
                "retrain the task on this base or load the base it was trained on"
            )

    @property
    def version(self) -> int:
        """The format version this pack is written as: 1 for a zeroshot head, else 2."""
        return 1 if self.head_kind == ZEROSHOT else FORMAT_VERSION

    def head_metadata(self) -> dict[str, Any]:
        """The `head` entry of a version-2 header."""
        entry: dict[str, Any] = {"kind": self.head_kind}
        if self.cache is not None:
            entry.update(alpha=self.cache.alpha, beta=self.cache.beta, cache_keys=int(self.cache.labels.size))
        return entry

    def metadata(self) -> dict[str, Any]:
        """The JSON-able header describing this pack."""
        extra = {"head": self.head_metadata()} if self.version >= 2 else {}
        return {
            "format": FORMAT_TAG,
            "version": self.version,
            **extra,
            "name": self.name,
            "class_names": self.class_names,
            "template": self.template,
            "logit_scale": float(self.logit_scale),
            "base_fingerprint": self.base_fingerprint,
            "model_name": self.model_name,
            "quick_gelu": bool(self.quick_gelu),
            "masked_tensors": [
                {"name": n, "shape": list(m.shape), "dtype": "bool"} for n, m in self.masks.items()
            ],
            "mask_encoding": "rmt-mask-v1",
            "sparsity": self.sparsity,
            "metrics": self.metrics,
            "hyperparameters": self.hyperparameters,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the pack atomically (temp file in the same folder, fsync, rename)."""
        from safetensors.numpy import save

        path = Path(path)
        tensors = {HEAD_KEY: self.head}
        if self.cache is not None:
            tensors[CACHE_KEYS_KEY] = self.cache.keys
            tensors[CACHE_LABELS_KEY] = self.cache.labels
        for tensor_name, keep in self.masks.items():
            tensors[MASK_PREFIX + tensor_name] = np.frombuffer(encode_mask(keep), dtype=np.uint8)
        meta_json = json.dumps(self.metadata())
        metadata = {METADATA_KEY: meta_json, CHECKSUM_KEY: _checksum(meta_json, tensors)}
        data = save(tensors, metadata=metadata)
        write_atomic(path, data)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, record: FileRecord | None = None,
             expected_name: str | None = None) -> "TaskPack":
        """Read and validate a pack; any problem raises ArtifactError naming the path.
        `record` / `expected_name`: the size, sha256 and name a bundle's manifest lists it with."""
        path = Path(path)
        try:
            return _load(path, record, expected_name)
        except RmtError as exc:
            if isinstance(exc, ArtifactError) and str(path) in str(exc):
                raise
            raise ArtifactError(f"{path}: {exc}") from None


@dataclass(frozen=True)
class EncodedTask:
    """A task file as stored: validated metadata, head and encoded masks (not decoded).

    For callers that want zero positions (masks.decode_zero_indices) or sizes
    without materialising one bool per weight, such as the runtime. `nbytes`: the file's size.
    """

    path: Path
    meta: dict[str, Any]
    head: np.ndarray
    blobs: dict[str, bytes]
    nbytes: int = 0
    head_kind: str = ZEROSHOT
    cache: Cache | None = None

    @property
    def name(self) -> str:
        return str(self.meta["name"])

    @property
    def base_fingerprint(self) -> str:
        return str(self.meta["base_fingerprint"])

    @property
    def mask_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape the metadata declares for each masked tensor (validated on read)."""
        return {str(e["name"]): tuple(e["shape"]) for e in self.meta["masked_tensors"]}


def read_encoded(path: str | os.PathLike, record: FileRecord | None = None,
                 expected_name: str | None = None) -> EncodedTask:
    """Read a task file once: its bytes checked against `record` (size, sha256) when given, then the
    container, checksum, format, metadata types, tensor set and head; masks left encoded.
    `expected_name`: the name a bundle lists the file under, which the task's own name must equal."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: no such task file")
    data = read_verified(path, record, MAX_TASK_FILE_BYTES, "task (.rmtask)")
    meta, tensors = _read_container(path, data)
    version = meta.get("version")
    readable = type(version) is int and version in VERSIONS
    check_format(meta, FORMAT_TAG, version if readable else FORMAT_VERSION, str(path), "upgrade rmt-deploy")
    _check_meta(meta, path)
    kind = _head_kind(meta, path)
    if expected_name is not None and meta["name"] != expected_name:
        raise ArtifactError(f"{path}: the file holds task {meta['name']!r}, but the bundle lists it as "
                            f"{expected_name!r}; rebuild the bundle with `rmt-deploy export`")
    names = [entry["name"] for entry in meta["masked_tensors"]]
    expected = {HEAD_KEY} | {MASK_PREFIX + name for name in names}
    if kind in CACHE_KINDS:
        expected |= {CACHE_KEYS_KEY, CACHE_LABELS_KEY}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ArtifactError(f"{path}: tensors do not match the metadata (missing {missing[:3]}, "
                            f"unexpected {extra[:3]})")
    head = tensors[HEAD_KEY]
    if head.dtype != np.float32 or head.ndim != 2 or head.shape[0] != len(meta["class_names"]):
        raise ArtifactError(f"{path}: head is {head.dtype} {list(head.shape)}, not float32 "
                            f"[{len(meta['class_names'])} classes, dim]")
    if not np.isfinite(head).all():
        raise ArtifactError(f"{path}: head holds NaN or Inf values")
    cache = _read_cache(meta, tensors, path) if kind in CACHE_KINDS else None
    blobs = {name: tensors[MASK_PREFIX + name].tobytes() for name in names}
    return EncodedTask(path, meta, np.array(head), blobs, len(data), kind, cache)


def _head_kind(meta: dict[str, Any], path: Path) -> str:
    """Version 1: zeroshot. Version 2: the `head` entry's kind, checked."""
    if meta["version"] == 1:
        return ZEROSHOT
    head = meta.get("head")
    if not isinstance(head, dict):
        raise ArtifactError(f"{path}: version-2 task file has no `head` entry: rewrite it with rmt-deploy train")
    try:
        return check_kind(head.get("kind"))
    except InputError as exc:
        raise ArtifactError(f"{path}: {exc}") from None


def _read_cache(meta: dict[str, Any], tensors: dict[str, np.ndarray], path: Path) -> Cache:
    """The Tip-Adapter cache, its layout checked against the class count and head before any copy."""
    keys, labels = tensors[CACHE_KEYS_KEY], tensors[CACHE_LABELS_KEY]
    classes, dim = len(meta["class_names"]), tensors[HEAD_KEY].shape[1]
    try:
        check_alpha_beta(meta["head"].get("alpha"), meta["head"].get("beta"))
        check_cache_layout(keys.shape, keys.dtype, labels.shape, labels.dtype, classes, dim)
        if keys.dtype != np.float16:
            raise InputError(f"tip-adapter cache keys are {keys.dtype}, not float16: rebuild the cache")
        check_labels(labels, classes)
        return Cache.build(keys, labels, meta["head"]["alpha"], meta["head"]["beta"], classes, dim)
    except InputError as exc:
        raise ArtifactError(f"{path}: {exc}") from None


def _check_meta(meta: dict[str, Any], path: Path) -> None:
    """Types and ranges of the metadata fields that reading and serving rely on."""
    missing = [key for key in _REQUIRED_META if key not in meta]
    if missing:
        raise ArtifactError(f"{path}: task file is incomplete or malformed (missing {', '.join(missing)})")
    if not isinstance(meta["name"], str) or not _TASK_NAME.match(meta["name"]):
        raise ArtifactError(f"{path}: task name {str(meta['name'])[:80]!r} is not valid")
    classes = meta["class_names"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ArtifactError(f"{path}: class_names must be a non-empty list of strings")
    scale = meta["logit_scale"]
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0 < scale <= 1e4:
        raise ArtifactError(f"{path}: logit_scale {scale!r} is not a number in (0, 10000]")
    if not all(isinstance(meta[k], str) for k in ("base_fingerprint", "model_name")):
        raise ArtifactError(f"{path}: base_fingerprint and model_name must be strings")
    tensors = meta["masked_tensors"]
    if not isinstance(tensors, list) or not tensors:
        raise ArtifactError(f"{path}: masked_tensors must be a non-empty list")
    seen = set()
    for entry in tensors:
        ok = isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("shape"), list)
        shape = entry.get("shape") if ok else None
        if not ok or not 1 <= len(shape) <= 8 or not all(isinstance(d, int) and not isinstance(d, bool)
                                                         and d >= 1 for d in shape):
            raise ArtifactError(f"{path}: masked tensor entry {str(entry)[:80]} is malformed")
        if math.prod(shape) > MAX_MASK_ELEMENTS or entry["name"] in seen:
            raise ArtifactError(f"{path}: masked tensor {entry['name']!r} is repeated or too large {shape}")
        seen.add(entry["name"])


def _checksum(meta_json: str, tensors: dict[str, np.ndarray]) -> str:
    """sha256 over the metadata JSON and every tensor, so any altered byte is caught."""
    digest = hashlib.sha256(meta_json.encode())
    for key in sorted(tensors):
        array = np.ascontiguousarray(tensors[key])
        digest.update(f"|{key}|{array.dtype.str}|{list(array.shape)}|".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def _read_container(path: Path, data: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    metadata, tensors = load_bytes(data, str(path))
    if METADATA_KEY not in metadata:
        raise ArtifactError(f"{path}: not an rmt-deploy task file (no '{METADATA_KEY}' metadata)")
    if metadata.get(CHECKSUM_KEY) != _checksum(metadata[METADATA_KEY], tensors):
        raise ArtifactError(f"{path}: checksum mismatch: the file was altered or damaged")
    try:
        meta = json.loads(metadata[METADATA_KEY])
    except (ValueError, RecursionError) as exc:
        raise ArtifactError(f"{path}: task metadata is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path}: task metadata is not a JSON object")
    return meta, tensors


def _load(path: Path, record: FileRecord | None, expected_name: str | None) -> TaskPack:
    encoded = read_encoded(path, record, expected_name)
    meta = encoded.meta
    try:
        masks = {name: decode_mask(encoded.blobs[name], shape) for name, shape in encoded.mask_shapes.items()}
        return TaskPack(
            name=meta["name"],
            class_names=list(meta["class_names"]),
            head=encoded.head,
            masks=masks,
            base_fingerprint=str(meta["base_fingerprint"]),
            model_name=str(meta["model_name"]),
            logit_scale=float(meta["logit_scale"]),
            template=str(meta.get("template", "")),
            metrics=dict(meta.get("metrics", {})),
            hyperparameters=dict(meta.get("hyperparameters", {})),
            quick_gelu=bool(meta.get("quick_gelu", False)),
            head_kind=encoded.head_kind,
            cache=encoded.cache,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ArtifactError(f"{path}: task file is incomplete or malformed ({type(exc).__name__}: {exc})") from None
