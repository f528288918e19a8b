"""A validating reader for the safetensors container (numpy only).

Every file we read is untrusted, so the header is checked before anything is
allocated from it: an 8-byte length within bounds, a JSON object whose entries are
exactly {dtype, shape, data_offsets}, known dtypes, shapes whose byte count equals
their offset range, and ranges that tile the data section with no gap or overlap
(the safetensors rule). Used for task files (parsed from bytes) and the bundle's
base weights (read in place, in file order).
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from rmt_deploy.errors import ArtifactError

MAX_HEADER_BYTES = 64 << 20
MAX_NDIM = 8
METADATA = "__metadata__"
DTYPES: Mapping[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: dtype, shape and its byte range in the data section."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    """A validated header: tensors in file order, string metadata, where the data section starts."""

    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int
    data_size: int


def header_length(prefix: bytes, file_size: int, where: str) -> int:
    """The JSON header's length from the first 8 bytes, checked against the file size and our bound."""
    if len(prefix) < 8:
        raise ArtifactError(f"{where}: {file_size} bytes is too short for a safetensors file (truncated?)")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length < 2 or length > MAX_HEADER_BYTES or 8 + length > file_size:
        raise ArtifactError(f"{where}: safetensors header length {length} is out of range for a "
                            f"{file_size}-byte file (truncated or not a safetensors file)")
    return length


def parse_header(header_bytes: bytes, file_size: int, where: str) -> Header:
    """Validate the JSON header (without its 8-byte length prefix) of a file of `file_size` bytes."""
    try:
        raw = json.loads(bytes(header_bytes))
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{where}: safetensors header is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise ArtifactError(f"{where}: safetensors header is a JSON {type(raw).__name__}, not an object")
    metadata = _metadata(raw.pop(METADATA, {}), where)
    data_start = 8 + len(header_bytes)
    entries = sorted((_entry(name, value, where) for name, value in raw.items()), key=lambda e: (e.start, e.end))
    position = 0
    for entry in entries:
        if entry.start != position:
            raise ArtifactError(f"{where}: tensor {entry.name!r} starts at byte {entry.start}, expected "
                                f"{position}: the data offsets overlap or leave a gap")
        position = entry.end
    if data_start + position != file_size:
        raise ArtifactError(f"{where}: the tensors cover {position} data bytes but the file holds "
                            f"{file_size - data_start} (truncated or extended)")
    return Header({e.name: e for e in entries}, metadata, data_start, position)


def _metadata(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ArtifactError(f"{where}: safetensors {METADATA} must map strings to strings")
    return value


def _entry(name: str, value: Any, where: str) -> TensorEntry:
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise ArtifactError(f"{where}: tensor {name!r} header entry must hold exactly dtype, shape, data_offsets")
    dtype = DTYPES.get(value["dtype"]) if isinstance(value["dtype"], str) else None
    if dtype is None:
        raise ArtifactError(f"{where}: tensor {name!r} has unsupported dtype {value['dtype']!r}")
    shape, offsets = value["shape"], value["data_offsets"]
    if not _int_list(shape) or len(shape) > MAX_NDIM:
        raise ArtifactError(f"{where}: tensor {name!r} has a malformed shape {str(shape)[:80]}")
    if not _int_list(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        raise ArtifactError(f"{where}: tensor {name!r} has malformed data_offsets {str(offsets)[:80]} "
                            "(need 0 <= start <= end)")
    nbytes = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise ArtifactError(f"{where}: tensor {name!r} is {value['dtype']} {shape} ({nbytes} bytes) but its "
                            f"offsets span {offsets[1] - offsets[0]} bytes")
    return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def load_bytes(data: bytes, where: str) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """Metadata and read-only tensor views of a whole safetensors file held in memory (no copy)."""
    length = header_length(data[:8], len(data), where)
    header = parse_header(memoryview(data)[8:8 + length], len(data), where)
    tensors = {}
    for entry in header.entries.values():
        start = header.data_start + entry.start
        tensors[entry.name] = np.frombuffer(data, entry.dtype, math.prod(entry.shape), start).reshape(entry.shape)
    return header.metadata, tensors
