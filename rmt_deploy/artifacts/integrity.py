"""Integrity of bundle files: paths confined to the bundle root, sizes and sha256 checked (numpy-free).

A bundle is copied between machines, so every path its manifest names is untrusted:
`confine` refuses absolute paths, '..', and symlinks that leave the root. A file's
recorded size and sha256 are checked by whoever reads it, while reading it
(`read_verified`, `Sha256Reader`), or on a helper thread while a library maps the file
itself (`BackgroundHash`), so no file is read twice on the load path.
Every file rmt-deploy reads (task files, checkpoints, images, dataset files) is first checked to be
a regular file of bounded size (`check_regular_file`, or `open_regular_file` where we read it
ourselves): a FIFO, a device such as /dev/zero or a directory is one error naming the path and what it is.
"""
from __future__ import annotations

import hashlib
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from rmt_deploy.errors import ArtifactError, RmtError

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 22
REBUILD = "rebuild the bundle with `rmt-deploy export`"


@dataclass(frozen=True)
class FileRecord:
    """What the manifest says about one bundle file: its byte size and the hex sha256 of its bytes."""

    size: int
    sha256: str

    @classmethod
    def from_json(cls, value: Any, where: str) -> "FileRecord":
        if not isinstance(value, dict) or set(value) != {"size", "sha256"}:
            raise ArtifactError(f"{where}: must be {{\"size\": bytes, \"sha256\": hex digest}}")
        size, digest = value["size"], value["sha256"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ArtifactError(f"{where}: size {size!r} is not a non-negative integer")
        if not isinstance(digest, str) or not _HEX64.match(digest):
            raise ArtifactError(f"{where}: sha256 {str(digest)[:80]!r} is not 64 lowercase hex digits")
        return cls(size, digest)

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256}

    def check(self, path: Path, size: int, digest: str) -> None:
        """ArtifactError unless the bytes read (size, digest) are the ones recorded."""
        if size != self.size:
            raise ArtifactError(f"{path}: {size} bytes, the manifest records {self.size}: the file is "
                                f"truncated, extended or replaced; {REBUILD}")
        if digest != self.sha256:
            raise ArtifactError(f"{path}: sha256 {digest[:12]}... differs from the manifest's "
                                f"{self.sha256[:12]}...: the file is damaged or replaced; {REBUILD}")


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _file_kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _check_stat(path: Path, info: os.stat_result, max_bytes: int | None, what: str | None,
                error: type[RmtError]) -> int:
    if not stat.S_ISREG(info.st_mode):
        expected = f"; pass {_a_file(what)}" if what else ""
        raise error(f"{path}: is {_file_kind(info.st_mode)}, not a regular file{expected}")
    if max_bytes is not None and info.st_size > max_bytes:
        raise error(f"{path}: {info.st_size:,} bytes is more than the {max_bytes:,} {_a_file(what)} may hold")
    return info.st_size


def _a_file(what: str | None) -> str:
    if not what:
        return "a file of its kind"
    return f"{'an' if what[0].lower() in 'aeiou' else 'a'} {what} file"


def check_regular_file(path: str | os.PathLike, max_bytes: int | None, what: str | None,
                       error: type[RmtError] = ArtifactError) -> int:
    """The size of `path` if it is a regular file of at most `max_bytes` (None: any size); otherwise
    `error` naming the path and what it is (missing, a directory, a FIFO, a device, too large)."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: no such file" + (f"; pass {_a_file(what)}" if what else "")) from None
    except OSError as exc:
        raise error(f"{path}: cannot read it ({exc.strerror})") from None
    return _check_stat(path, info, max_bytes, what, error)


def open_regular_file(path: str | os.PathLike, max_bytes: int | None, what: str | None,
                      error: type[RmtError] = ArtifactError) -> BinaryIO:
    """`path` opened for reading (unbuffered) after checking, on the open file, that it is a regular file
    of at most `max_bytes`: opened non-blocking, so a FIFO swapped in after a check cannot hang us."""
    path = Path(path)
    check_regular_file(path, max_bytes, what, error)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise error(f"{path}: cannot read it ({exc.strerror})") from None
    try:
        _check_stat(path, os.fstat(fd), max_bytes, what, error)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def read_regular_file(path: str | os.PathLike, max_bytes: int, what: str | None,
                      error: type[RmtError] = ArtifactError) -> bytes:
    """A whole regular file's bytes, at most `max_bytes` (also if it grows while read)."""
    with open_regular_file(path, max_bytes, what, error) as handle:
        size = os.fstat(handle.fileno()).st_size
        parts = [handle.read(size + 1)]  # one read(2) returns at most ~2 GiB: go on until the end
        while parts[-1] and (total := sum(map(len, parts))) <= max_bytes:
            parts.append(handle.read(max_bytes + 1 - total))
    parts = [part for part in parts if part]
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    if len(data) > max_bytes:
        raise error(f"{path}: more than the {max_bytes:,} bytes {_a_file(what)} may hold (it grew while read)")
    return data


def relative_path(value: Any, where: str) -> str:
    """A manifest path, checked for form: a non-empty relative POSIX path with no '..' or odd parts."""
    if not isinstance(value, str) or not value or len(value) > 1024 or "\x00" in value or "\\" in value:
        raise ArtifactError(f"{where}: {repr(value)[:80]} is not a relative file path inside the bundle")
    path = PurePosixPath(value)
    if path.is_absolute() or any(part in ("..", ".", "") for part in value.split("/")):
        raise ArtifactError(f"{where}: path {value!r} leaves the bundle (absolute or with '..'); "
                            f"a bundle names only its own files; {REBUILD}")
    return value


def confine(root: Path, relative: str, where: str) -> Path:
    """The real path of `relative` under `root`; ArtifactError if a symlink takes it outside the root."""
    relative_path(relative, where)
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(real_root / relative))
    if real != real_root and real_root not in real.parents:
        raise ArtifactError(f"{where}: {relative!r} resolves to {real}, outside the bundle {real_root} "
                            f"(a symlink?); {REBUILD}")
    return real


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in chunks (never the whole file in memory)."""
    with Sha256Reader(path) as reader:
        reader.skip_to_end()
        return reader.hexdigest()


def read_verified(path: Path, record: FileRecord | None, limit: int, what: str | None = None) -> bytes:
    """A whole (small) file's bytes, checked against its record while read; at most `limit` bytes."""
    try:
        data = read_regular_file(path, limit, what)
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read it ({exc.strerror})") from None
    if record is not None:
        record.check(path, len(data), hashlib.sha256(data).hexdigest())
    return data


class Sha256Reader:
    """Reads a file front to back, hashing every byte it passes (into buffers, or skipped)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._handle = open_regular_file(self.path, None, None)
        self._digest = hashlib.sha256()
        self.position = 0

    def readinto(self, view: memoryview) -> int:
        """Fill `view` (fewer bytes only at the end of the file); every byte read is hashed."""
        done = 0
        while done < len(view):
            count = self._handle.readinto(view[done:done + _CHUNK])
            if not count:
                break
            self._digest.update(view[done:done + count])
            done += count
        self.position += done
        return done

    def read(self, size: int) -> bytes:
        data = bytearray(size)
        count = self.readinto(memoryview(data))
        return bytes(data[:count])

    def skip_to(self, offset: int) -> None:
        """Hash (and discard) the bytes up to `offset`."""
        scratch = memoryview(bytearray(min(_CHUNK, max(0, offset - self.position)) or 1))
        while self.position < offset:
            if not self.readinto(scratch[:min(len(scratch), offset - self.position)]):
                return

    def skip_to_end(self) -> None:
        self.skip_to(1 << 62)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "Sha256Reader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class BackgroundHash:
    """The sha256 of a file computed on a helper thread (hashlib releases the GIL), for files that
    a library (ONNX Runtime) maps itself, so the file is read once (docs/performance.md: why)."""

    def __init__(self, path: Path, record: FileRecord | None):
        self.path, self.record = path, record
        self._result: tuple[int, str] | BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="rmt-hash", daemon=True)
        if record is not None:
            self._thread.start()

    def _run(self) -> None:
        try:
            with Sha256Reader(self.path) as reader:
                reader.skip_to_end()
                self._result = (reader.position, reader.hexdigest())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller of check()
            self._result = exc

    def check(self) -> None:
        """Wait for the hash; ArtifactError if the file differs from its record."""
        if self.record is None:
            return
        self._thread.join()
        if isinstance(self._result, BaseException):
            raise self._result
        size, digest = self._result
        self.record.check(self.path, size, digest)
