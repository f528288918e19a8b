"""Multi-node: a Ray cluster of a 0-CPU head and two worker nodes (ray.cluster_utils, the same
raylets `ray start --head` / `ray start --address` run), the app placed across them."""
from __future__ import annotations

import time

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'rmt-deploy[ray]')")
serve = pytest.importorskip("ray.serve")
requests = pytest.importorskip("requests")

pytestmark = pytest.mark.slow


def test_serve_joins_a_cluster_replicas_run_on_the_worker_nodes_and_answer(ray_bundle, serve_process, tmp_path):
    """`RAY_ADDRESS=HEAD rmt-deploy serve --engine ray` on a 0-CPU head + 2 worker nodes."""
    from ray.cluster_utils import Cluster

    from rmt_deploy.runtime.engine import Engine

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    served = None
    try:
        workers = {cluster.add_node(num_cpus=1).node_id, cluster.add_node(num_cpus=1).node_id}
        served = serve_process.start(ray_bundle, tmp_path / "serve.log", "--replicas", "2", "--threads", "1",
                                     engine="ray", env={"RAY_ADDRESS": cluster.address}, timeout=180)
        url = f"http://{served.http_url}/v2/models/rmt"
        image = np.random.default_rng(1).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
        with Engine.load(ray_bundle, threads=1) as engine:
            for task in ("task0", "task1", "task2"):
                body = {"inputs": [{"name": "task", "datatype": "BYTES", "shape": [1, 1], "data": [task]},
                                   {"name": "image", "datatype": "UINT8", "shape": list(image.shape),
                                    "data": image.reshape(-1).tolist()}]}
                response = requests.post(f"{url}/infer", json=body, timeout=60)
                assert response.status_code == 200, response.text
                probs = {o["name"]: o["data"] for o in response.json()["outputs"]}["probs"]
                want = np.sort(engine.predict(list(image), task=task).probs[0])[::-1]
                assert np.allclose(probs[:len(want)], want, rtol=0, atol=1e-6)
        deadline = time.time() + 60  # the ingress's router may not list the second replica at once
        while len(replicas := requests.get(f"{url}/stats", timeout=30).json()["replicas"]) < 2:
            assert time.time() < deadline, replicas
            time.sleep(0.5)
        assert {r["node"] for r in replicas} == workers  # one replica per worker node; the 0-CPU head runs none
        status = serve_process.stop(served, timeout=120)
        assert status == 0, served.log.read_text(errors="replace")[-3000:]
    finally:
        if served is not None:
            serve_process.stop(served, timeout=5)
        try:
            ray.init(address=cluster.address, log_to_driver=False)
            serve.shutdown()  # the joined cluster keeps Serve running: stop it before the cluster goes
        finally:
            ray.shutdown()
            cluster.shutdown()
