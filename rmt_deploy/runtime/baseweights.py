"""The base values of the masked tensors, read from the bundle's weights file (numpy only).

The file is safetensors; tensors are read with `readinto` straight into the pool's
first buffer, so loading never holds a second dense copy (no mmap, no temporary).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from rmt_deploy.errors import ArtifactError

_DTYPES = {"F32": "float32", "F16": "float16", "BF16": None, "F64": "float64"}
_MAX_HEADER = 100 << 20


class SafetensorsReader:
    """Index of a safetensors file: name -> (dtype, shape, byte range); reads tensors in place."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                size = handle.seek(0, 2)
                handle.seek(0)
                (length,) = struct.unpack("<Q", handle.read(8))
                if length > min(_MAX_HEADER, size - 8):
                    raise ValueError(f"header length {length} exceeds the file")
                header = json.loads(handle.read(length))
        except (OSError, ValueError, struct.error) as exc:
            raise ArtifactError(f"{self.path}: not a readable weights file ({exc}); re-export the bundle") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + length
        self.file_size = size
        self.entries = header

    def read_into(self, name: str, out: np.ndarray) -> None:
        """Copy tensor `name` into `out` (same dtype and shape); ArtifactError on any mismatch."""
        entry = self.entries.get(name)
        if entry is None:
            raise ArtifactError(f"{self.path}: no tensor {name!r}; the bundle is incomplete, re-export it")
        try:
            dtype = _DTYPES.get(entry["dtype"])
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{self.path}: malformed entry for {name!r} ({exc})") from None
        if dtype != out.dtype.name or shape != out.shape or end - start != out.nbytes:
            raise ArtifactError(
                f"{self.path}: tensor {name!r} is {entry.get('dtype')} {list(shape)}, the bundle expects "
                f"{out.dtype.name} {list(out.shape)}; re-export the bundle"
            )
        if not out.flags.c_contiguous:
            raise ArtifactError(f"internal: buffer for {name!r} is not contiguous")
        if self.data_start + end > self.file_size:
            raise ArtifactError(f"{self.path}: truncated (tensor {name!r} ends past the file end)")
        with open(self.path, "rb") as handle:
            handle.seek(self.data_start + start)
            view = memoryview(out.reshape(-1)).cast("B")
            got = handle.readinto(view)
        if got != out.nbytes:
            raise ArtifactError(f"{self.path}: truncated while reading {name!r}")
