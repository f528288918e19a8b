"""Writing a folder all at once: build it beside its destination, then rename it into place.

    with staged_folder(out) as stage:
        ...write files under stage...

On success the stage replaces `out` (an old `out` is moved aside first, then removed); on any
failure it is removed and `out` is left as it was. Stages left by a killed process are
cleared by the next write to the same destination.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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


def _publish(stage: Path, out: Path) -> None:
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
