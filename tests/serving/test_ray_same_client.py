"""One client script, both engines: the tritonclient helpers that drive the Triton server's tests
(tests/serving/clients.py, binary tensors by default) run unchanged against `rmt-deploy serve
--engine triton` and `--engine ray`, and get the in-process Engine's answers from both."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install 'rmt-deploy[ray]')")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.slow


def _start(bundle, log, engine: str, clients) -> tuple[subprocess.Popen, str]:
    if engine == "triton":
        pytest.importorskip("pytriton", reason="nvidia-pytriton (tritonserver) is not installed")
    http, grpc, metrics = clients.free_ports(3)
    command = [sys.executable, "-m", "rmt_deploy.cli", "serve", "--engine", engine, "--bundle", str(bundle),
               "--host", "127.0.0.1", "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port",
               str(metrics), "--top-k", str(clients.TOP_K), "--max-image-pixels", str(clients.MAX_PIXELS),
               "--replicas", "2", "--threads", "1"]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    url = f"127.0.0.1:{http}"
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"serve --engine {engine} exited {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            pass
        if time.monotonic() > deadline:
            _stop(process)
            raise RuntimeError(f"serve --engine {engine} not ready after 180 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def _stop(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode


@pytest.fixture(scope="module", params=["triton", "ray"])
def served(request, serve_bundle, clients, tmp_path_factory):
    process, url = _start(serve_bundle, tmp_path_factory.mktemp(request.param) / "serve.log", request.param,
                          clients)
    try:
        yield request.param, url
    finally:
        assert _stop(process) == 0, f"serve --engine {request.param} did not exit 0 on SIGTERM"


def test_the_same_client_gets_the_engines_answers(served, clients, engine, images):
    kind, url = served
    client = httpclient.InferenceServerClient(url)
    try:
        assert client.is_server_ready()
        for task in clients.TASKS:
            for image in images[:3]:
                want = clients.expected(engine, task, image, clients.TOP_K)
                got = clients.infer("http", client, clients.request(httpclient, task, image=image))
                assert clients.mismatch(got, want) is None, (kind, task, clients.mismatch(got, want))
            png = clients.encode(images[0], "PNG")
            got = clients.infer("http", client, clients.request(httpclient, task, image_bytes=png))
            assert clients.mismatch(got, clients.expected(engine, task, images[0], clients.TOP_K)) is None, kind
    finally:
        client.close()


@pytest.mark.parametrize("args, message", [
    ({"task": "nope"}, "not served (available: alpha, beta, delta, gamma)"),
    ({}, "missing input 'task'"),
])
def test_the_same_bad_request_gets_the_same_error(served, clients, images, args, message):
    kind, url = served
    client = httpclient.InferenceServerClient(url)
    try:
        inputs = clients.request(httpclient, args.get("task"), image=images[0])
        with pytest.raises(InferenceServerException) as info:
            clients.infer("http", client, inputs)
        assert message in str(info.value), (kind, str(info.value))
    finally:
        client.close()
