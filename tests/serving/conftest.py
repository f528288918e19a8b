"""Serving fixtures: a four-task tiny bundle, a real `rmt-deploy serve` on free local ports, clients."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest


def _load_clients():
    import importlib.util

    spec = importlib.util.spec_from_file_location("serving_clients", Path(__file__).with_name("clients.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLIENTS = _load_clients()  # helpers and constants shared by the serving tests (tests use the fixture)
TASKS, TOP_K, MAX_PIXELS = CLIENTS.TASKS, CLIENTS.TOP_K, CLIENTS.MAX_PIXELS


@pytest.fixture(scope="session")
def serve_task_files(make_taskpack, tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("serve_tasks")
    return [make_taskpack(name, seed=seed, zeros=0.1, classes=classes).save(folder / f"{name}.rmtask")
            for name, (seed, classes) in TASKS.items()]


@pytest.fixture(scope="session")
def serve_bundle(tiny_checkpoint, serve_task_files, tmp_path_factory) -> Path:
    """A shared + folded bundle of the four tasks (3 to 9 classes, so some have fewer than TOP_K)."""
    pytest.importorskip("onnxruntime")
    from rmt_deploy.export import ExportConfig, export_bundle

    out = tmp_path_factory.mktemp("serve_bundle") / "bundle"
    export_bundle(ExportConfig("rmt-tiny-vit", str(tiny_checkpoint), serve_task_files, out, mode="both"),
                  progress=False)
    return out


@pytest.fixture(scope="session")
def engine(serve_bundle):
    """The in-process reference: the same bundle through Engine.predict."""
    from rmt_deploy.runtime.engine import Engine

    with Engine.load(serve_bundle, cache_tasks=4) as loaded:
        yield loaded


@dataclass
class Served:
    process: subprocess.Popen
    http: int
    grpc: int
    metrics: int
    log: Path

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc}"


def wait_ready(served: Served, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if served.process.poll() is not None:
            raise RuntimeError(f"rmt-deploy serve exited {served.process.returncode}:\n{served.log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://{served.http_url}/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"rmt-deploy serve not ready after {timeout} s:\n{served.log.read_text()}")


def start_server(bundle: Path, log: Path, *args: str) -> Served:
    pytest.importorskip("tritonclient.http")
    pytest.importorskip("pytriton", reason="nvidia-pytriton (tritonserver) is not installed")
    http, grpc, metrics = CLIENTS.free_ports(3)
    command = [sys.executable, "-m", "rmt_deploy.cli", "serve", "--bundle", str(bundle), "--host", "127.0.0.1",
               "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
               "--top-k", str(TOP_K), "--drain-timeout", "5", *args]
    handle = open(log, "wb")
    process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    handle.close()
    served = Served(process, http, grpc, metrics, log)
    try:
        wait_ready(served)
    except BaseException:
        stop_server(served)
        raise
    return served


def stop_server(served: Served, timeout: float = 60.0) -> int:
    if served.process.poll() is None:
        served.process.send_signal(signal.SIGTERM)
        try:
            served.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(served.process.pid, signal.SIGKILL)
            served.process.wait()
    return served.process.returncode


@pytest.fixture(scope="module")
def server(serve_bundle, tmp_path_factory):
    """`rmt-deploy serve` on the four-task bundle (cache_tasks 2: four tasks force pool rewrites)."""
    served = start_server(serve_bundle, tmp_path_factory.mktemp("serve") / "serve.log", "--max-queue-delay-us",
                          "2000", "--max-image-pixels", str(MAX_PIXELS))
    try:
        yield served
    finally:
        stop_server(served)


@pytest.fixture(scope="session")
def images() -> list[np.ndarray]:
    """Random uint8 RGB images of different sizes (the server resizes them)."""
    rng = np.random.default_rng(11)
    sizes = [(32, 32), (40, 56), (64, 48), (17, 90), (32, 33), (100, 100), (8, 8), (45, 30)]
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


@pytest.fixture(scope="session")
def clients():
    """tests/serving/clients.py: tritonclient request / answer helpers, TASKS, TOP_K, MAX_PIXELS."""
    return CLIENTS


@pytest.fixture
def launch(tmp_path):
    """launch(bundle, *args) -> a fresh `rmt-deploy serve`, stopped after the test; plus launch.stop(served)."""
    started: list[Served] = []

    def start(bundle: Path, *args: str) -> Served:
        served = start_server(bundle, tmp_path / f"serve-{len(started)}.log", *args)
        started.append(served)
        return served

    start.stop = stop_server
    try:
        yield start
    finally:
        for served in started:
            stop_server(served)
