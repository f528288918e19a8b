"""The base values of the masked tensors, read from the bundle's weights file (numpy only).

The file is safetensors with a validated header (rmt_deploy.artifacts.safetensors_header). Its
tensors are read front to back with `readinto` straight into the pool's first buffer
while every byte is hashed, so loading holds no second dense copy and reads the file
once; the digest is checked against the manifest's record at the end. Nothing stays open or
mapped after the read, so the file may change under a live engine without effect.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from rmt_deploy.artifacts.integrity import REBUILD, FileRecord, Sha256Reader
from rmt_deploy.artifacts.safetensors_header import Header, TensorEntry, header_length, parse_header
from rmt_deploy.errors import ArtifactError


class SafetensorsReader:
    """Validated index of a safetensors file; reads its tensors in place."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as handle:
                length = header_length(handle.read(8), size, str(self.path))
                self.header: Header = parse_header(handle.read(length), size, str(self.path))
        except OSError as exc:
            raise ArtifactError(f"{self.path}: cannot read it ({exc.strerror}); {REBUILD}") from None
        self.file_size = size

    @property
    def entries(self) -> dict[str, TensorEntry]:
        return self.header.entries

    def entry(self, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> TensorEntry:
        """The tensor `name`, checked to be `dtype` `shape` (call before allocating its buffer)."""
        entry = self.entries.get(name)
        if entry is None:
            raise ArtifactError(f"{self.path}: no tensor {name!r}; the bundle is incomplete, {REBUILD}")
        if entry.dtype != np.dtype(dtype) or entry.shape != tuple(shape):
            raise ArtifactError(f"{self.path}: tensor {name!r} is {entry.dtype.name} {list(entry.shape)}, the "
                                f"bundle expects {np.dtype(dtype).name} {list(shape)}; {REBUILD}")
        return entry

    def read_into(self, name: str, out: np.ndarray) -> None:
        """Copy one tensor into `out` (same dtype and shape), without hashing."""
        entry = self.entry(name, out.dtype, out.shape)
        with open(self.path, "rb", buffering=0) as handle:
            handle.seek(self.header.data_start + entry.start)
            got = handle.readinto(_bytes(out))
        if got != entry.nbytes:
            raise ArtifactError(f"{self.path}: truncated while reading {name!r}")

    def read_all_into(self, outs: Mapping[str, np.ndarray], record: FileRecord | None) -> str:
        """Read the whole file once in order: tensors named in `outs` into their buffers, every byte
        hashed; then check size and sha256 against `record` (when the manifest has one). Returns the
        hex sha256."""
        for name, out in outs.items():
            self.entry(name, out.dtype, out.shape)
        with Sha256Reader(self.path) as reader:
            for entry in self.entries.values():  # file order
                reader.skip_to(self.header.data_start + entry.start)
                out = outs.get(entry.name)
                if out is not None and reader.readinto(_bytes(out)) != entry.nbytes:
                    raise ArtifactError(f"{self.path}: truncated while reading {entry.name!r}")
            reader.skip_to_end()
            if record is not None:
                record.check(self.path, reader.position, reader.hexdigest())
            return reader.hexdigest()


def _bytes(out: np.ndarray) -> memoryview:
    if not out.flags.c_contiguous:
        raise ArtifactError("internal: a base-weights buffer is not contiguous")
    return memoryview(out.reshape(-1)).cast("B")
