"""`rmt-deploy serve --engine ray`: a real process on a local Ray cluster, queried, stopped with SIGTERM."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install 'rmt-deploy[ray]')")
requests = pytest.importorskip("requests")

CLI = [sys.executable, "-c", "from rmt_deploy.cli import main; main()"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_task_bundle(tmp_path_factory, tiny_checkpoint, make_taskpack):
    export = pytest.importorskip("rmt_deploy.export")

    root = tmp_path_factory.mktemp("cli_packs")
    paths = [make_taskpack(name, seed=seed, classes=3).save(root / f"{name}.rmtask")
             for name, seed in (("alpha", 1), ("beta", 2))]
    out = tmp_path_factory.mktemp("cli_bundle") / "bundle"
    export.export_bundle(export.ExportConfig("rmt-tiny-vit", str(tiny_checkpoint), task_paths=paths, out=out,
                                             target="onnx", mode="shared", max_batch=4), progress=False)
    return out


def test_a_bad_bundle_is_one_line_and_exit_1(tmp_path):
    result = subprocess.run([*CLI, "serve", "--engine", "ray", "--bundle", str(tmp_path / "nope")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "nope" in result.stderr


@pytest.mark.slow
def test_serve_engine_ray_answers_and_stops_on_sigterm(two_task_bundle):
    port = _free_port()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)  # a local cluster of its own
    process = subprocess.Popen([*CLI, "serve", "--engine", "ray", "--bundle", str(two_task_bundle),
                                "--replicas", "1", "--threads", "1", "--host", "127.0.0.1",
                                "--http-port", str(port), "--top-k", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert process.poll() is None, process.communicate()[1][-3000:]
            try:
                if requests.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.time() < deadline, "not ready after 120 s"
            time.sleep(1)
        image = np.random.default_rng(0).integers(0, 256, (1, 24, 24, 3)).reshape(-1).tolist()
        body = {"inputs": [{"name": "task", "datatype": "BYTES", "shape": [1, 1], "data": ["beta"]},
                           {"name": "image", "datatype": "UINT8", "shape": [1, 24, 24, 3], "data": image}]}
        response = requests.post(f"{url}/v2/models/rmt/infer", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert {o["name"]: o["shape"] for o in response.json()["outputs"]}["probs"] == [1, 2]
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err[-3000:]
        assert "serving" in err and "stopped" in err
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
