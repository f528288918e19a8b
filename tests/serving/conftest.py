"""Serving fixtures: the four-task and the Ray bundles (make_bundle), a real `rmt-deploy serve` of either
engine on free local ports, a local Ray cluster for in-process Serve apps, clients."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

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
def serve_bundle(make_bundle) -> Path:
    """A shared + folded bundle of the four tasks (3 to 9 classes, so some have fewer than TOP_K)."""
    return make_bundle([(name, seed, 0.1, classes) for name, (seed, classes) in TASKS.items()], mode="both")


RAY_TASKS = [(f"task{i}", 10 + i, 0.1, 2 + i % 4) for i in range(8)]  # (name, seed, zeros, classes)


@pytest.fixture(scope="session")
def ray_bundle(make_bundle) -> Path:
    """A shared-mode bundle of 8 tasks task0..task7 (2 to 5 classes): the Ray apps' bundle."""
    return make_bundle(RAY_TASKS, mode="shared", max_batch=4)


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


def wait_ready(served: Served, timeout: float = 120.0, interval: float = 0.3) -> None:
    """Until GET /v2/health/ready answers 200 (asked every `interval` s); RuntimeError with the log if the
    server exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if served.process.poll() is not None:
            log = served.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"rmt-deploy serve exited {served.process.returncode}:\n{log}")
        try:
            with urllib.request.urlopen(f"http://{served.http_url}/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(interval)
    log = served.log.read_text(errors="replace")[-3000:]
    raise RuntimeError(f"rmt-deploy serve not ready after {timeout} s:\n{log}")


def start_server(bundle: Path, log: Path, *args: str, engine: str = "triton", env: dict | None = None,
                 timeout: float = 120.0, interval: float = 0.3) -> Served:
    """`rmt-deploy serve --engine ENGINE` on free local ports, ready (asked every `interval` s); ray: a
    local cluster of its own unless env names RAY_ADDRESS."""
    if engine == "triton":
        pytest.importorskip("tritonclient.http")
        pytest.importorskip("pytriton", reason="nvidia-pytriton (tritonserver) is not installed")
    http, grpc, metrics = CLIENTS.free_ports(3)
    command = [sys.executable, "-m", "rmt_deploy.cli", "serve", "--engine", engine, "--bundle", str(bundle),
               "--host", "127.0.0.1", "--http-port", str(http), "--grpc-port", str(grpc),
               "--metrics-port", str(metrics), "--top-k", str(TOP_K), "--drain-timeout", "5", *args]
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    environment.update(RAY_USAGE_STATS_ENABLED="0", **(env or {}))
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=environment,
                                   start_new_session=True)
    served = Served(process, http, grpc, metrics, log)
    try:
        wait_ready(served, timeout, interval)
    except BaseException:
        stop_server(served)
        raise
    return served


def stop_server(served: Served, timeout: float = 60.0) -> int:
    """SIGTERM, then SIGKILL to the whole process group after `timeout` s; the exit status."""
    if served.process.poll() is None:
        served.process.send_signal(signal.SIGTERM)
        try:
            served.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(served.process.pid, signal.SIGKILL)
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


@pytest.fixture(scope="session")
def serve_process() -> SimpleNamespace:
    """start(bundle, log, *args, engine=, env=, timeout=, interval=) / stop(served) / wait_ready(served): a real
    `rmt-deploy serve` process of either engine (the launch and server fixtures use the same)."""
    return SimpleNamespace(start=start_server, stop=stop_server, wait_ready=wait_ready)


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


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local Ray cluster (2 CPUs) with Serve's HTTP proxy on a free port, for one test module: .url,
    and .deploy(config, route_prefix) (see `deployed`). Serve and Ray are shut down at the end, whatever
    happens."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'rmt-deploy[ray]')")
    serve = pytest.importorskip("ray.serve")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # Serve's router gives a replica 0.1 s to report its queue, else routes the request to any replica (and
    # a multiplexed task lands where it is not resident); `make test` runs another worker beside this one on
    # two cores, so give it 1 s (the cluster's processes inherit this)
    os.environ.setdefault("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "1.0")
    os.environ.setdefault("RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "2.0")
    (port,) = CLIENTS.free_ports(1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", deploy=deployed)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@contextlib.contextmanager
def deployed(config, route_prefix: str = "/"):
    """The rmt-deploy Ray app for `config` running on the current cluster; deleted on exit. Beside
    the app at "/", another one goes at route_prefix "/v2/models/<its model_name>"."""
    from ray import serve

    from rmt_deploy.serving.ray import build_app

    serve.run(build_app(config), name=config.app_name, route_prefix=route_prefix)
    try:
        yield
    finally:
        serve.delete(config.app_name)
