"""One client script, both engines: the tritonclient helpers that drive the Triton server's tests
(tests/serving/clients.py, binary tensors by default) run unchanged against `rmt-deploy serve
--engine triton` and `--engine ray`, and get the in-process Engine's answers from both; both stop on
SIGTERM with exit status 0."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install 'rmt-deploy[ray]')")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["triton", "ray"])
def served(request, serve_bundle, serve_process, clients, tmp_path_factory):
    """`rmt-deploy serve --engine ...` on the four-task bundle; on SIGTERM it exits 0 (and the ray
    engine says it served and stopped)."""
    log = tmp_path_factory.mktemp(request.param) / "serve.log"
    env, ray_tmp = None, None
    if request.param == "ray":  # a dead cluster's address where ray.init() looks first: serve starts its own
        ray_tmp = Path(tempfile.mkdtemp(prefix="rmt-ray-", dir="/tmp"))  # short: Ray's socket paths live in it
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{clients.free_ports(1)[0]}")
        env = {"RAY_TMPDIR": str(ray_tmp)}
    try:
        process = serve_process.start(serve_bundle, log, "--max-image-pixels", str(clients.MAX_PIXELS),
                                      "--replicas", "2", "--threads", "1", engine=request.param, env=env,
                                      timeout=180)
        try:
            yield request.param, process.http_url
        finally:
            status = serve_process.stop(process, timeout=120)
            text = log.read_text(errors="replace")
            assert status == 0, f"serve --engine {request.param} exited {status} on SIGTERM:\n{text[-3000:]}"
            if request.param == "ray":
                assert "serving" in text and "stopped" in text, text[-3000:]
    finally:
        if ray_tmp is not None:
            shutil.rmtree(ray_tmp, ignore_errors=True)


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
