"""Run `rmt-deploy ARGS...` counting its filesystem mutations; die right after the Nth, or stop before it.

    python crash_child.py         # a zygote: imports the export stack once, then per line on stdin
      {"run": {"log": LOG, "crash_at": N, "hold_at": M, "hold_dir": DIR, "out": FILE, "args": [...]}}
      {"wait": PID}               # answers {"pid": PID} / {"status": exit status} on stdout

Each run is a fork of the zygote (torch imported, never run, so forking is safe) that installs
the counters and calls rmt_deploy.cli.main(args), its output going to FILE.

Every open for writing (open, io.open, os.open with a write or create flag), rename, replace,
renameat2 (staging.rename2), link, unlink, remove, mkdir, rmdir and rmtree (one mutation,
its inner calls not counted) is appended to LOG as "N op path". With CRASH_AT = N > 0 the
process exits at once (os._exit(77), as a kill would leave it) right after mutation N; with
HOLD_AT = N > 0 it creates HOLD_DIR/held before mutation N and waits for HOLD_DIR/go.
"""
from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import sys
import time

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_real = {"open": builtins.open, "os.open": os.open}
_state = {"count": 0, "inside": False}
CRASH_AT = HOLD_AT = 0
HOLD_DIR = ""
_log_fd = -1


def _mutation(op: str, path: object, call, *args, **kwargs):
    if _state["inside"]:
        return call(*args, **kwargs)
    number = _state["count"] + 1
    if number == HOLD_AT:
        _real["open"](os.path.join(HOLD_DIR, "held"), "w").close()
        while not os.path.exists(os.path.join(HOLD_DIR, "go")):
            time.sleep(0.02)
    _state["inside"] = True
    try:
        result = call(*args, **kwargs)
    finally:
        _state["inside"] = False
    _state["count"] = number
    os.write(_log_fd, f"{number} {op} {os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else path}\n"
             .encode())
    if number == CRASH_AT:
        os._exit(77)
    return result


def _wrap(op: str, call, path_arg: int = 0):
    def wrapped(*args, **kwargs):
        return _mutation(op, args[path_arg] if len(args) > path_arg else kwargs.get("path"), call, *args, **kwargs)
    return wrapped


def _open(file, mode="r", *args, **kwargs):
    if isinstance(file, int) or not any(c in mode for c in "wax+"):
        return _real["open"](file, mode, *args, **kwargs)
    return _mutation("open", file, _real["open"], file, mode, *args, **kwargs)


def _os_open(path, flags, *args, **kwargs):
    if not flags & _WRITE_FLAGS:
        return _real["os.open"](path, flags, *args, **kwargs)
    return _mutation("os.open", path, _real["os.open"], path, flags, *args, **kwargs)


def install(log: str, crash_at: int, hold_at: int, hold_dir: str) -> None:
    global CRASH_AT, HOLD_AT, HOLD_DIR, _log_fd
    CRASH_AT, HOLD_AT, HOLD_DIR = crash_at, hold_at, hold_dir
    _log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    builtins.open = io.open = _open
    os.open = _os_open
    for name in ("replace", "rename", "link", "unlink", "remove", "mkdir", "rmdir"):
        setattr(os, name, _wrap(name, getattr(os, name), 1 if name in ("replace", "rename", "link") else 0))
    shutil.rmtree = _wrap("rmtree", shutil.rmtree)
    from rmt_deploy.artifacts import staging

    if hasattr(staging, "rename2"):  # (absent before issue #24: the harness also runs on older code)
        staging.rename2 = _wrap("rename2", staging.rename2, 1)


def _child(request: dict) -> None:
    out = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    code = 0
    try:
        install(request["log"], request.get("crash_at", 0), request.get("hold_at", 0), request.get("hold_dir", ""))
        from rmt_deploy.cli import main

        main(request["args"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - a traceback is what the test looks for
        import traceback

        traceback.print_exc()
        code = 3
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def zygote() -> None:
    import onnx  # noqa: F401  (the commands and the stacks they use, imported once)
    import onnxruntime  # noqa: F401
    import open_clip  # noqa: F401
    import torch  # noqa: F401

    import rmt_deploy.basemodel.loading  # noqa: F401
    import rmt_deploy.cli.bundle  # noqa: F401
    import rmt_deploy.cli.export  # noqa: F401
    import rmt_deploy.export  # noqa: F401
    import rmt_deploy.export.onnx  # noqa: F401
    import rmt_deploy.export.pipeline  # noqa: F401
    import rmt_deploy.tools.bundle_edit  # noqa: F401

    for line in sys.stdin:
        request = json.loads(line)
        if "run" in request:
            pid = os.fork()
            if pid == 0:
                _child(request["run"])
            answer = {"pid": pid}
        else:
            _, status = os.waitpid(request["wait"], 0)
            answer = {"status": os.waitstatus_to_exitcode(status)}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    zygote()
