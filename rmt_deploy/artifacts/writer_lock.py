"""One lock for every writer of a bundle (or of a Triton repository), numpy only, Linux.

    with writer_lock(Path("bundle")):       # waits up to `wait` seconds, then names the holder
        ...read the manifest, write, publish...

The lock is an exclusive flock on the bundle directory itself, so it leaves no file behind and
a killed writer's lock goes with its process. A directory replaced while a writer waited (an
export published a new bundle at the path) is noticed after the lock is taken: the writer
then locks the new directory, so it never edits a bundle that is no longer at the path. A
writer that must wait says once whom it waits for; after `wait` seconds it fails in one line
naming the holder's pid and command (read from /proc/locks).
"""
from __future__ import annotations

import fcntl
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from rmt_deploy.errors import InputError

WAIT_SECONDS = 30.0  # how long a second writer waits for the first, unless RMT_DEPLOY_LOCK_WAIT says
WAIT_ENV = "RMT_DEPLOY_LOCK_WAIT"


def lock_wait() -> float:
    """Seconds a writer waits for the lock: $RMT_DEPLOY_LOCK_WAIT, else WAIT_SECONDS."""
    try:
        return max(0.0, float(os.environ.get(WAIT_ENV, WAIT_SECONDS)))
    except ValueError:
        raise InputError(f"{WAIT_ENV}={os.environ[WAIT_ENV]!r} is not a number of seconds") from None


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@contextmanager
def writer_lock(root: Path, wait: float | None = None, say: Callable[[str], None] = _say) -> Iterator[None]:
    """Hold the writers' lock of the existing directory `root` (a bundle or a repository); wait at most
    `wait` seconds (default: lock_wait())."""
    fd = _locked_fd(Path(root), lock_wait() if wait is None else wait, say)
    try:
        yield
    finally:
        os.close(fd)  # closing drops the flock


@contextmanager
def lock_if_present(root: Path, wait: float | None = None) -> Iterator[None]:
    """`writer_lock(root)` when `root` is a directory; nothing to lock (a new path) otherwise."""
    if Path(root).is_dir():
        with writer_lock(root, wait):
            yield
    else:
        yield


def _locked_fd(root: Path, wait: float, say: Callable[[str], None]) -> int:
    deadline = time.monotonic() + max(0.0, wait)
    told = False
    while True:
        fd = _open_dir(root)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    holder = lock_holder(fd)
                    if time.monotonic() >= deadline:
                        raise InputError(f"{root}: another writer holds this bundle's lock ({holder}); retry "
                                         "when it has finished") from None
                    if not told:
                        say(f"waiting for {root}: another writer holds its lock ({holder})")
                        told = True
                    time.sleep(0.05)
            if _same_dir(fd, root):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the path holds another directory now (a bundle was replaced): lock that one


def _open_dir(root: Path) -> int:
    try:
        return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InputError(f"{root} does not exist") from None
    except NotADirectoryError:
        raise InputError(f"{root} is not a directory") from None
    except OSError as exc:
        raise InputError(f"{root}: cannot open it ({exc.strerror})") from None


def _same_dir(fd: int, root: Path) -> bool:
    try:
        now = os.stat(root)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def lock_holder(fd: int) -> str:
    """'pid N: COMMAND' of the process holding a flock on the file `fd` is open on, as far as /proc tells."""
    inode = os.fstat(fd).st_ino
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            for line in locks:
                parts = line.split()
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == str(inode) \
                        and parts[4].isdigit():
                    return f"pid {parts[4]}: {_command(int(parts[4]))}"
    except OSError:
        pass
    return "holder unknown"


def _command(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    words = [w.decode(errors="replace") for w in raw.split(b"\0") if w]
    text = " ".join(Path(words[0]).name if i == 0 else w for i, w in enumerate(words))
    return text[:200] or "?"
