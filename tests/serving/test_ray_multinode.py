"""Multi-node: a Ray cluster of a 0-CPU head and two worker nodes (ray.cluster_utils, the same
raylets `ray start --head` / `ray start --address` run), the app placed across them."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'rmt-deploy[ray]')")
serve = pytest.importorskip("ray.serve")
requests = pytest.importorskip("requests")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def three_task_bundle(tmp_path_factory, tiny_checkpoint, make_taskpack):
    export = pytest.importorskip("rmt_deploy.export")

    root = tmp_path_factory.mktemp("multinode_packs")
    paths = [make_taskpack(f"t{i}", seed=i, classes=3).save(root / f"t{i}.rmtask") for i in range(3)]
    out = tmp_path_factory.mktemp("multinode_bundle") / "bundle"
    export.export_bundle(export.ExportConfig("rmt-tiny-vit", str(tiny_checkpoint), task_paths=paths, out=out,
                                             target="onnx", mode="shared", max_batch=4), progress=False)
    return out


def test_serve_joins_a_cluster_replicas_run_on_the_worker_nodes_and_answer(three_task_bundle):
    """`RAY_ADDRESS=HEAD rmt-deploy serve --engine ray` on a 0-CPU head + 2 worker nodes."""
    from ray.cluster_utils import Cluster

    from rmt_deploy.runtime.engine import Engine

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    process = None
    try:
        workers = {cluster.add_node(num_cpus=1).node_id, cluster.add_node(num_cpus=1).node_id}
        env = dict(os.environ, RAY_ADDRESS=cluster.address, RAY_USAGE_STATS_ENABLED="0")
        process = subprocess.Popen([sys.executable, "-m", "rmt_deploy.cli", "serve", "--engine", "ray",
                                    "--bundle", str(three_task_bundle), "--replicas", "2", "--threads", "1",
                                    "--host", "127.0.0.1", "--http-port", str(port)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                   start_new_session=True)
        url = f"http://127.0.0.1:{port}/v2/models/rmt"
        deadline = time.time() + 180
        while True:
            assert process.poll() is None, process.communicate()[1][-3000:]
            try:
                if requests.get(f"{url}/ready", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.time() < deadline, "not ready after 180 s"
            time.sleep(1)
        image = np.random.default_rng(1).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
        with Engine.load(three_task_bundle, threads=1) as engine:
            for task in ("t0", "t1", "t2"):
                body = {"inputs": [{"name": "task", "datatype": "BYTES", "shape": [1, 1], "data": [task]},
                                   {"name": "image", "datatype": "UINT8", "shape": list(image.shape),
                                    "data": image.reshape(-1).tolist()}]}
                response = requests.post(f"{url}/infer", json=body, timeout=60)
                assert response.status_code == 200, response.text
                probs = {o["name"]: o["data"] for o in response.json()["outputs"]}["probs"]
                want = np.sort(engine.predict(list(image), task=task).probs[0])[::-1]
                assert np.allclose(probs[:3], want, rtol=0, atol=1e-6)
        deadline = time.time() + 60  # the ingress's router may not list the second replica at once
        while len(replicas := requests.get(f"{url}/stats", timeout=30).json()["replicas"]) < 2:
            assert time.time() < deadline, replicas
            time.sleep(1)
        assert {r["node"] for r in replicas} == workers  # one replica per worker node; the 0-CPU head runs none
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err[-3000:]
    finally:
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        try:
            ray.init(address=cluster.address, log_to_driver=False)
            serve.shutdown()  # the joined cluster keeps Serve running: stop it before the cluster goes
        finally:
            ray.shutdown()
            cluster.shutdown()
