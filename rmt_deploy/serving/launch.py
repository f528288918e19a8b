"""Serving one bundle with Triton Inference Server until SIGTERM or Ctrl-C, every task behind one model.

Writes a model repository for the bundle (serving.triton_repo) into a private workspace,
runs the tritonserver binary from the nvidia-pytriton wheel on it (serving.tritonserver),
and on SIGTERM or Ctrl-C lets Triton finish the requests in flight before exiting 0.
A model worker (a Python-backend stub, one per instance) that dies does not leave a server that
still says ready while it answers every request with HTTP 500: `serve` watches the workers,
and when one is gone it stops tritonserver and exits 1 naming the worker, so that the
supervisor (systemd, Kubernetes, a restart loop) starts a fresh server, which loads the
bundle as it is then. Restarting the worker in place is not done: a fault that recurs would
loop unseen.
"""
from __future__ import annotations

import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from rmt_deploy.errors import InputError
from rmt_deploy.serving.triton_repo import ServingConfig
from rmt_deploy.serving.tritonserver import Ports, ServerError

if TYPE_CHECKING:
    from rmt_deploy.serving.tritonserver import TritonServer

# Triton's log line once no inference is in flight during shutdown (it then unloads the models)
DRAINED = "Found 0 model versions that have in-flight inferences"


def check_port_free(host: str, port: int, option: str) -> None:
    """InputError naming the option when `port` cannot be bound on `host`."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise InputError(f"{option} {port} on {host} is not free ({exc.strerror}); pick another port") from None


def _check_started(server: "TritonServer", workers: dict[int, str], instances: int) -> None:
    """ServerError (after stopping Triton) when fewer model workers run than the model has instances.

    Triton says ready once every instance's worker has started, so a missing one died between ready
    and this look (a client that saw ready first can be sending it requests already): its pid is a
    zombie child of tritonserver's while Triton has not reaped it."""
    if len(workers) >= instances:
        return
    gone = server.exited_children()
    server.stop(timeout=5)
    pid = f"pid {gone[0]}, " if gone else ""
    raise ServerError(f"a model worker of tritonserver died ({pid}{instances - len(workers)} of {instances}); "
                      "the server was stopped so that its supervisor restarts it")


def _check_workers(server: "TritonServer", workers: dict[int, str]) -> None:
    """ServerError (after stopping Triton) when a model worker has died."""
    dead = server.dead_workers(workers)
    if dead:
        server.stop(timeout=5)
        raise ServerError(f"a model worker of tritonserver died (pid {dead[0]}, {len(dead)} of {len(workers)}); "
                          "the server was stopped so that its supervisor restarts it")


def serve_bundle(bundle_path: Path, ports: Ports, config: ServingConfig, drain_timeout: int,
                 say: Callable[[str], None]) -> None:
    """Serve until SIGTERM / SIGINT, then drain; ServerError if Triton fails or dies."""
    from rmt_deploy.artifacts.bundle import Bundle
    from rmt_deploy.serving.triton_repo import write_engine_model
    from rmt_deploy.serving.tritonserver import TritonServer

    config.validate()
    bundle = Bundle.open(bundle_path)
    for option, port in (("--http-port", ports.http), ("--grpc-port", ports.grpc), ("--metrics-port", ports.metrics)):
        check_port_free(ports.host, port, option)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    workspace = Path(tempfile.mkdtemp(prefix="rmt-serve-"))
    try:
        repo = workspace / "models"
        write_engine_model(repo, bundle, config)
        server = TritonServer(repo, workspace, ports, workspace / "triton.log",
                              extra=[f"--exit-timeout-secs={drain_timeout}"])
        try:
            server.wait_ready()
            say(f"serving {len(bundle.tasks)} tasks ({', '.join(bundle.tasks)}) as model "
                       f"'{config.model_name}': http {server.url}, grpc {ports.host}:{ports.grpc}, "
                       f"metrics :{ports.metrics}/metrics; Ctrl-C or SIGTERM to stop")
            workers = server.model_workers()
            _check_started(server, workers, config.instances)  # one may have died before this look
            while not stop.is_set() and server.process.poll() is None:
                _check_workers(server, workers)
                stop.wait(0.5)
            if not stop.is_set():
                raise ServerError(f"tritonserver exited with status {server.process.returncode}:\n"
                                  f"{server.log_errors()}")
            say("stopping: finishing the requests in flight")
        finally:
            status = server.stop(timeout=drain_timeout + 30)
        if status != 0 and DRAINED not in server.log.read_text(errors="replace"):
            raise ServerError(f"tritonserver did not drain within {drain_timeout} s (status {status}):\n"
                              f"{server.log_errors()}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(workspace, ignore_errors=True)
