"""Run the Triton Inference Server binary that the nvidia-pytriton wheel ships, on a model repository.

The wheel's Python-backend stub is built per Python minor version and links libpython3.X by
soname; it is copied into a private backend folder, started with this interpreter's LIBDIR
first on LD_LIBRARY_PATH (else a different build of the same Python, such as pyenv's, fails
with `'_thread.RLock' object has no attribute '_recursion_count'`) and with this interpreter's
bin folder first on PATH, so the stub's embedded Python uses this environment's packages.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from rmt_deploy.errors import MissingDependencyError, RmtError

SERVE_EXTRA = "pip install 'rmt-deploy[serve]'"


class ServerError(RmtError):
    """Triton failed to start or to load a model; the message carries the end of its log."""


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002
    host: str = "0.0.0.0"


def distribution() -> Path:
    """The tritonserver folder inside the installed nvidia-pytriton wheel (bin/, backends/, stubs)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"nvidia-pytriton (which ships tritonserver) is not installed; {SERVE_EXTRA}")
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise MissingDependencyError(f"{root}/bin/tritonserver is missing: reinstall with {SERVE_EXTRA}")
    return root


def libpython_dir() -> Path:
    """The folder holding this interpreter's shared libpython, which the stub must load."""
    libdir = sysconfig.get_config_var("LIBDIR")
    ldlibrary = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY") or ""
    if not libdir or not ldlibrary.endswith(tuple(f".so{s}" for s in ("", ".1.0"))) \
            or not (Path(libdir) / ldlibrary).exists():
        raise ServerError(
            f"this Python ({sys.executable}) has no shared libpython ({libdir}/{ldlibrary or 'libpython?.so'}); "
            "Triton's Python backend needs one: use a Python built with --enable-shared (the system python3, "
            "or pyenv with PYTHON_CONFIGURE_OPTS=--enable-shared)")
    return Path(libdir)


def prepare_backends(workspace: Path) -> Path:
    """A backend folder holding the Python backend with the stub for this interpreter's version."""
    dist = distribution()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton ships no Python-backend stub for Python {version} "
                          f"({stub.parent.parent} has {', '.join(sorted(p.name for p in stub.parent.parent.iterdir()))})")
    target = workspace / "backends" / "python"
    shutil.copytree(dist / "backends" / "python", target, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(stub, target / "triton_python_backend_stub")
    return workspace / "backends"


def server_env() -> dict[str, str]:
    """The environment for tritonserver and its stubs: this interpreter's libpython and packages first."""
    env = dict(os.environ)
    libs = [str(libpython_dir()), str(distribution().parent.parent / "nvidia_pytriton.libs")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("PYTHONHOME", None)
    return env


STUB = "triton_python_backend_stub"


def _processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state letter, command line) of every process /proc shows."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        found[int(entry)] = (int(fields[1]), fields[0], command.strip())
    return found


def command(repo: Path, backends: Path, ports: Ports, extra: Sequence[str] = ()) -> list[str]:
    return [str(distribution() / "bin" / "tritonserver"), f"--model-repository={repo}",
            f"--backend-directory={backends}", f"--http-address={ports.host}", f"--http-port={ports.http}",
            f"--grpc-address={ports.host}", f"--grpc-port={ports.grpc}", f"--metrics-address={ports.host}",
            f"--metrics-port={ports.metrics}", "--allow-metrics=true", "--allow-gpu-metrics=false",
            "--exit-on-error=true", "--log-verbose=0", *extra]


class TritonServer:
    """A tritonserver child process; `wait_ready` blocks until /v2/health/ready, `stop` drains it."""

    def __init__(self, repo: Path, workspace: Path, ports: Ports, log: Path, extra: Sequence[str] = ()):
        self.ports = ports
        self.log = log
        backends = prepare_backends(workspace)
        self._log_file = open(log, "wb")
        self.process = subprocess.Popen(command(repo, backends, ports, extra), env=server_env(),
                                        stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.ports.host in ("0.0.0.0", "") else self.ports.host
        return f"http://{host}:{self.ports.http}"

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Return once the server and its models are ready; ServerError (with the log's end) if it dies or stalls."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with status {self.process.returncode} while starting:\n"
                                  f"{self.log_errors()}")
            if self.ready():
                return
            time.sleep(0.2)
        self.stop()
        raise ServerError(f"tritonserver was not ready after {timeout:.0f} s:\n{self.log_errors()}")

    def model_workers(self) -> dict[int, str]:
        """The Python-backend stub processes of this server (pid -> command): one per model instance."""
        return {pid: command for pid, (parent, _, command) in _processes().items()
                if parent == self.process.pid and STUB in command}

    def exited_children(self) -> list[int]:
        """Children of this server that have exited and are not reaped yet (zombies: /proc keeps no command)."""
        return sorted(pid for pid, (parent, state, _) in _processes().items()
                      if parent == self.process.pid and state == "Z")

    def dead_workers(self, workers: dict[int, str]) -> list[int]:
        """Those of `workers` that have exited (gone, or a zombie not yet reaped)."""
        now = _processes()
        return [pid for pid, command in workers.items()
                if pid not in now or now[pid][1] == "Z" or now[pid][2] != command]

    def log_tail(self, lines: int = 25) -> str:
        if not self._log_file.closed:
            self._log_file.flush()
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def log_errors(self, lines: int = 6) -> str:
        """The log's error lines (glog 'E' lines, else its last lines), and where the whole log is."""
        tail = self.log_tail(400).splitlines()
        errors = [line for line in tail if line.startswith("E") and line[1:5].isdigit()] or tail[-lines:]
        return "\n".join(errors[-lines:] + [f"(tritonserver log: {self.log})"])

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (Triton finishes the requests in flight, then exits); SIGKILL after `timeout`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()
        return self.process.returncode

    def __enter__(self) -> "TritonServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
