"""Writing a folder all at once: build it beside its destination, then swap it into place.

    with writer_lock(out):                  # when `out` exists (artifacts.writer_lock)
        with staged_folder(out) as stage:
            ...write files under stage...

On success the stage takes the place of `out` in one step: a new `out` is renamed into place
(RENAME_NOREPLACE), an existing one is exchanged with the stage (renameat2 RENAME_EXCHANGE),
so at every instant the path holds the old folder or the new one, never neither; the old
one, now under the stage's name, is then removed. On any failure the stage is removed and
`out` is left as it was. Each stage is flock-ed by its writer while it exists: the next
write to the same destination removes every stage no one holds (what a killed writer left).
Where the filesystem cannot exchange (renameat2 unsupported), two renames are used and the
old folder waits under `.NAME.old-*` in between; the next write puts it back if the path is
empty then. What is published has the modes the user's umask gives (a temporary folder is
made 0700, and some writers make files 0600).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import platform
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from rmt_deploy.errors import InputError

PARTIAL = ".partial-"
OLD = ".old-"
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
WRITE_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}
_SYSCALL_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A temporary directory beside `out`, swapped onto it on success and removed on any failure.
    The caller holds `writer_lock(out)` when `out` exists."""
    _check_writable_parent(out)
    remove_stale(out)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}{PARTIAL}{os.getpid()}-", dir=out.parent))
    except OSError as exc:
        raise InputError(f"cannot write beside {out} ({exc.strerror}); choose a writable folder") from None
    hold = _hold(stage)
    try:
        try:
            yield stage
        except OSError as exc:  # no space, file too large, read-only, permission: one line naming the path
            if exc.errno not in WRITE_ERRORS:
                raise
            raise InputError(f"cannot write {out}: {_reason(exc, stage, out)}; nothing was published") from None
        _publish(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        os.close(hold)


def _check_writable_parent(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create {out.parent} ({exc.strerror}); choose a writable folder") from None


def _reason(exc: OSError, stage: Path, out: Path) -> str:
    """strerror, with the file it concerns named inside `out` rather than inside the stage."""
    name = str(exc.filename) if exc.filename is not None else ""
    where = name.replace(str(stage), str(out)) if name else ""
    return f"{where}: {exc.strerror or exc}" if where else str(exc.strerror or exc)


def _hold(folder: Path) -> int:
    """An fd holding an exclusive flock on `folder`: it is in use while this process lives."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


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
    if not os.path.lexists(out):
        try:
            rename2(stage, out, RENAME_NOREPLACE)
        except FileExistsError:
            raise InputError(f"{out} was created by another writer during this one; nothing was replaced "
                             "(run again with --force to replace it)") from None
        except NotImplementedError:
            os.rename(stage, out)
        return
    try:
        rename2(stage, out, RENAME_EXCHANGE)  # out: the new folder; stage: the old one
    except NotImplementedError:
        _publish_in_two_renames(stage, out)
        return
    shutil.rmtree(stage, ignore_errors=True)


def _publish_in_two_renames(stage: Path, out: Path) -> None:
    """Where renameat2 is missing: out -> .NAME.old-*, stage -> out (remove_stale undoes a crash between)."""
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}{OLD}", dir=out.parent))
    old.rmdir()
    os.rename(out, old)
    os.rename(stage, out)
    shutil.rmtree(old, ignore_errors=True)


def rename2(source: Path, target: Path, flags: int) -> None:
    """renameat2(2): RENAME_NOREPLACE or RENAME_EXCHANGE; NotImplementedError where the OS or the
    filesystem has no such rename."""
    call = _renameat2()
    if call is None:
        raise NotImplementedError("renameat2")
    if call(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        raise NotImplementedError("renameat2")
    raise OSError(code, os.strerror(code), str(target))


def _renameat2():
    if not hasattr(_renameat2, "call"):
        _renameat2.call = None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            return None
        if hasattr(libc, "renameat2"):
            call = libc.renameat2
            call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            _renameat2.call = call
        elif platform.system() == "Linux" and platform.machine() in _SYSCALL_RENAMEAT2:
            number = _SYSCALL_RENAMEAT2[platform.machine()]
            _renameat2.call = lambda *args: libc.syscall(number, *args)
    return _renameat2.call


def remove_stale(out: Path) -> None:
    """Remove the stages of writes to `out` that no process holds (left by a killed writer); put an old
    folder back when a two-rename publish was killed between its renames."""
    for path in sorted(out.parent.glob(f".{out.name}{PARTIAL}*")) + sorted(out.parent.glob(f".{out.name}{OLD}*")):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # a live writer's
        try:
            if path.name.startswith(f".{out.name}{OLD}") and not os.path.lexists(out):
                os.rename(path, out)
            else:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass  # not ours to clean (e.g. a read-only folder); the next writer tries again
        finally:
            os.close(fd)


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
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRORS:
            raise InputError(f"cannot write {path}: {exc.strerror}; it was left as it was") from None
        raise


def write_json(path: Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically; numpy scalars become plain numbers."""
    text = json.dumps(data, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    write_atomic(path, (text + "\n").encode())
