"""Writing a folder all at once: build it beside its destination, then rename it into place.

    with staged_folder(out) as stage:
        ...write files under stage...

On success the stage replaces `out` (an old `out` is moved aside first, then removed); on any
failure it is removed and `out` is left as it was. Stages left by a killed process are
cleared by the next write to the same destination. What is published has the modes the
user's umask gives (a temporary folder is made 0700, and some writers make files 0600).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from rmt_deploy.errors import InputError

PARTIAL = ".partial-"


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A temporary directory beside `out`, renamed onto it on success and removed on any failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}{PARTIAL}{os.getpid()}-", dir=out.parent))
    try:
        yield stage
        _publish(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def usual_mode(directory: bool = False) -> int:
    """The mode a new file (0666) or folder (0777) gets under this process's umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def _umask() -> int:
    try:  # Linux says it without changing it; os.umask can only read by setting, racing other threads
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _usual_modes(stage: Path) -> None:
    folder_mode, file_mode = usual_mode(directory=True), usual_mode()
    os.chmod(stage, folder_mode)
    for root, folders, files in os.walk(stage):
        for name in folders:
            os.chmod(os.path.join(root, name), folder_mode)
        for name in files:
            os.chmod(os.path.join(root, name), file_mode)


def _publish(stage: Path, out: Path) -> None:
    _usual_modes(stage)
    if not out.exists():
        os.rename(stage, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    os.rename(out, old)
    os.rename(stage, out)
    shutil.rmtree(old, ignore_errors=True)


def remove_stale(out: Path) -> None:
    """Remove staging directories left by writes to `out` whose process is gone (e.g. killed)."""
    for path in out.parent.glob(f".{out.name}{PARTIAL}*"):
        pid = path.name[len(f".{out.name}{PARTIAL}"):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to path via a temp file in the same folder, fsync and rename."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"output folder {folder} does not exist: create it first")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise InputError(f"cannot write to {folder}: {exc.strerror}; choose a writable folder") from None
    try:
        os.fchmod(fd, usual_mode())  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically; numpy scalars become plain numbers."""
    text = json.dumps(data, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    write_atomic(path, (text + "\n").encode())
