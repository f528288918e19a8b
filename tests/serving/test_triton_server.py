"""`rmt-deploy serve` end to end: a real Triton server, real tritonclient calls over HTTP and gRPC."""
from __future__ import annotations

import io
import random
import re
import struct
import threading
import time
import urllib.request
import zlib

import numpy as np
import pytest

tritonclient_utils = pytest.importorskip("tritonclient.utils")
InferenceServerException = tritonclient_utils.InferenceServerException


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_served_answers_equal_engine_predict_for_every_task(server, engine, images, clients, kind):
    client = clients.make_client(kind, server)
    try:
        for task in clients.TASKS:
            for image in images[:4]:
                got = clients.infer(kind, client, clients.request(clients.client_module(kind), task, image))
                want = clients.expected(engine, task, image, clients.TOP_K)
                assert clients.mismatch(got, want) is None, (task, clients.mismatch(got, want))
    finally:
        client.close()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_image_bytes_are_decoded_like_the_engine_reads_the_file(server, engine, images, clients, fmt):
    from PIL import Image

    client = clients.make_client("http", server)
    try:
        data = clients.encode(images[1], fmt)
        got = clients.infer("http", client, clients.request(clients.client_module("http"), "gamma", image_bytes=data))
        decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert clients.mismatch(got, clients.expected(engine, "gamma", decoded, clients.TOP_K)) is None
    finally:
        client.close()


def test_one_request_of_several_tasks_is_answered_in_order(server, engine, images, clients):
    import tritonclient.grpc as module

    tasks = ["delta", "alpha", "delta", "beta"]
    stack = np.stack([images[0]] * len(tasks))
    inputs = [clients.tensor(module, "task", np.array([[t.encode()] for t in tasks], dtype=object)),
              clients.tensor(module, "image", stack)]
    client = clients.make_client("grpc", server)
    try:
        got = clients.infer("grpc", client, inputs)
    finally:
        client.close()
    for row, task in enumerate(tasks):
        want = clients.expected(engine, task, images[0], clients.TOP_K)
        assert clients.mismatch({k: v[row:row + 1] for k, v in got.items()}, want,
                                clients.BATCHED_PROBS_TOL) is None, (row, task)


def _bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG header declaring width x height pixels, with a tiny (truncated) body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _bad_requests(module, clients, image):
    big = np.zeros((150, 150, 3), np.uint8)  # 22,500 pixels > the test server's 20,000
    tensor, request = clients.tensor, clients.request
    return {
        "unknown task": (request(module, "dtdd", image), r"task 'dtdd' not served \(available: alpha, beta, delta, gamma\)"),
        "missing task": (request(module, None, image), r"missing input 'task'"),
        "missing image": (request(module, "alpha"), r"neither of 'image' and 'image_bytes'"),
        "both images": (request(module, "alpha", image, clients.encode(image, "PNG")), r"both of 'image' and"),
        "wrong dtype": ([tensor(module, "task", np.array([[b"alpha"]], dtype=object)),
                         tensor(module, "image", image[None].astype(np.float32))], r"'image' data-type is 'FP32', but model 'rmt' expects 'UINT8'"),
        "wrong rank": ([tensor(module, "task", np.array([[b"alpha"]], dtype=object)),
                        tensor(module, "image", image[None, :, :, 0])], r"(?i)shape"),
        "four channels": ([tensor(module, "task", np.array([[b"alpha"]], dtype=object)),
                           tensor(module, "image", np.zeros((1, 8, 8, 4), np.uint8))], r"(?i)shape"),
        "empty image": ([tensor(module, "task", np.array([[b"alpha"]], dtype=object)),
                         tensor(module, "image", np.zeros((1, 0, 8, 3), np.uint8))], r"empty|shape"),
        "too large": (request(module, "alpha", big), r"150x150 pixels, more than the server's limit of 20,000"),
        "not an image": (request(module, "alpha", image_bytes=b"GIF89a not really"), r"is not a JPEG, PNG"),
        "empty bytes": (request(module, "alpha", image_bytes=b""), r"'image_bytes' is empty"),
        "decompression bomb": (request(module, "alpha", image_bytes=_bomb_png(5000, 5000)),
                               r"5000x5000 pixels, more than the server's limit of 20,000"),
        "huge bomb": (request(module, "alpha", image_bytes=_bomb_png(20000, 20000)),
                      r"declares more pixels than the server's limit of 20,000"),
        "not utf-8 task": ([tensor(module, "task", np.array([[b"\xff\xfe"]], dtype=object)),
                            tensor(module, "image", image[None])], r"not UTF-8"),
    }


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_every_bad_request_gets_its_own_error_and_the_server_keeps_serving(server, engine, images, clients, kind):
    module = clients.client_module(kind)
    client = clients.make_client(kind, server)
    try:
        for label, (inputs, pattern) in _bad_requests(module, clients, images[0]).items():
            with pytest.raises(InferenceServerException) as caught:
                clients.infer(kind, client, inputs)
            assert re.search(pattern, caught.value.message()), (label, caught.value.message())
        got = clients.infer(kind, client, clients.request(module, "beta", images[2]))
        assert clients.mismatch(got, clients.expected(engine, "beta", images[2], clients.TOP_K)) is None
    finally:
        client.close()


def _hammer(server, clients, references, images, malformed: float, seed: int, clients_n: int = 64,
            requests_n: int = 20) -> dict[str, list]:
    """clients_n threads x requests_n requests, tasks at random; a share of them malformed."""
    import tritonclient.http as module

    outcome = {"wrong": [], "failed": [], "bad_accepted": [], "bad_refused": 0, "good": 0}
    lock = threading.Lock()
    barrier = threading.Barrier(clients_n)

    def worker(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        client = module.InferenceServerClient(server.http_url, connection_timeout=120, network_timeout=120)
        try:
            barrier.wait()
            for _ in range(requests_n):
                task, j = rng.choice(list(clients.TASKS)), rng.randrange(len(images))
                bad = rng.random() < malformed
                inputs = (clients.request(module, task + "-nope", images[j]) if bad and rng.random() < 0.5 else
                          clients.request(module, task, image_bytes=b"junk") if bad else
                          clients.request(module, task, images[j]))
                try:
                    got = clients.infer("http", client, inputs, outputs=("labels", "probs", "index"))
                except InferenceServerException as exc:
                    with lock:
                        if bad:
                            outcome["bad_refused"] += 1
                        else:
                            outcome["failed"].append(exc.message())
                    continue
                with lock:
                    if bad:
                        outcome["bad_accepted"].append(task)
                    else:
                        outcome["good"] += 1
                        problem = clients.mismatch(got, {k: references[task, j][k] for k in got},
                                                  clients.BATCHED_PROBS_TOL)
                        if problem:
                            outcome["wrong"].append((task, j, problem))
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    return outcome


@pytest.fixture(scope="module")
def references(engine, images, clients):
    return {(task, j): clients.expected(engine, task, image, clients.TOP_K)
            for task in clients.TASKS for j, image in enumerate(images)}


@pytest.mark.slow
def test_64_concurrent_clients_over_four_tasks_get_only_right_answers(server, references, images, clients):
    outcome = _hammer(server, clients, references, images, malformed=0.0, seed=1)
    assert outcome["good"] == 64 * 20
    assert outcome["failed"] == [] and outcome["wrong"] == []


@pytest.mark.slow
def test_malformed_requests_fail_alone_among_64_concurrent_clients(server, references, images, clients):
    outcome = _hammer(server, clients, references, images, malformed=0.10, seed=2)
    assert outcome["bad_accepted"] == [] and outcome["failed"] == [] and outcome["wrong"] == []
    assert outcome["bad_refused"] > 64 * 20 * 0.05
    assert outcome["good"] + outcome["bad_refused"] == 64 * 20


def _metrics(server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics", timeout=10) as response:
        return response.read().decode()


def test_metrics_count_requests_per_task_and_pool_hits_and_misses(server, images, clients):
    client = clients.make_client("http", server)
    try:
        for task in ("alpha", "beta", "gamma", "alpha"):
            clients.infer("http", client, clients.request(clients.client_module("http"), task, images[0]))
        with pytest.raises(InferenceServerException):
            clients.infer("http", client, clients.request(clients.client_module("http"), "nope", images[0]))
    finally:
        client.close()
    text = _metrics(server)

    def value(pattern: str) -> float:
        found = re.search(pattern + r" (\S+)", text)
        assert found, (pattern, text[-2000:])
        return float(found.group(1))

    assert value(r'rmt_task_requests_total\{model="rmt",task="alpha"\}') >= 2
    assert value(r'rmt_task_requests_total\{model="rmt",task="gamma"\}') >= 1
    assert value(r'rmt_request_errors_total\{model="rmt"\}') >= 1
    assert value(r'rmt_task_pool_misses_total\{model="rmt"\}') >= 3  # 3+ tasks through a pool of 2 buffers
    assert value(r'rmt_task_pool_hits_total\{model="rmt"\}') >= 0
    assert value(r'nv_inference_request_success\{model="rmt",version="1"\}') >= 4  # Triton's own metrics


def test_sigterm_finishes_the_requests_in_flight_and_exits_0(serve_bundle, references, images, clients, launch):
    """Requests waiting in the batcher's queue (2 s delay) when SIGTERM arrives are still answered; exit 0."""
    import tritonclient.grpc as module

    served = launch(serve_bundle, "--max-queue-delay-us", "2000000", "--max-batch", "64")
    answers: dict[int, object] = {}
    sending = [threading.Event() for _ in range(12)]

    def one(i: int) -> None:
        client = module.InferenceServerClient(served.grpc_url)
        try:
            sending[i].set()
            task, j = list(clients.TASKS)[i % 4], i % len(images)
            got = clients.infer("grpc", client, clients.request(module, task, images[j]),
                                outputs=("labels", "probs", "index"))
            answers[i] = clients.mismatch(got, {k: references[task, j][k] for k in got},
                                          clients.BATCHED_PROBS_TOL) or "ok"
        except InferenceServerException as exc:
            answers[i] = exc.message()
        finally:
            client.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for event in sending:
        event.wait(30)
    time.sleep(0.5)  # every request is in the batcher's queue now (answered ~2 s after the first came)
    status = launch.stop(served)
    for thread in threads:
        thread.join(60)
    assert answers == {i: "ok" for i in range(12)}
    assert status == 0, served.log.read_text()[-3000:]


def test_serve_refuses_a_port_in_use_in_one_line(serve_bundle):
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "rmt_deploy.cli", "serve", "--bundle", str(serve_bundle),
                                 "--host", "127.0.0.1", "--http-port", str(port)], capture_output=True, text=True,
                                timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: --http-port {port} on 127.0.0.1 is not free (Address already in use); pick another port"]


def test_a_request_naming_no_outputs_gets_all_four(server, engine, images, clients):
    import tritonclient.http as module

    client = clients.make_client("http", server)
    try:
        result = client.infer("rmt", clients.request(module, "delta", images[5]))
    finally:
        client.close()
    got = {name: result.as_numpy(name) for name in clients.OUTPUTS}
    assert clients.mismatch(got, clients.expected(engine, "delta", images[5], clients.TOP_K)) is None
