"""Autoscaling on a real local Ray cluster: min 1, max 2 replicas, target 1 ongoing request; under
sustained load from 8 clients Serve adds the second replica (after its default 30 s upscale
delay) and no request fails meanwhile."""
from __future__ import annotations

import os
import socket
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'rmt-deploy[ray]')")
serve = pytest.importorskip("ray.serve")
requests = pytest.importorskip("requests")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def one_task_bundle(tmp_path_factory, tiny_checkpoint, make_taskpack):
    export = pytest.importorskip("rmt_deploy.export")

    path = make_taskpack("solo", seed=5, classes=3).save(tmp_path_factory.mktemp("scale_packs") / "solo.rmtask")
    out = tmp_path_factory.mktemp("scale_bundle") / "bundle"
    export.export_bundle(export.ExportConfig("rmt-tiny-vit", str(tiny_checkpoint), task_paths=[path], out=out,
                                             target="onnx", mode="shared", max_batch=4), progress=False)
    return out


def test_load_adds_a_replica_within_the_autoscaling_range(one_task_bundle):
    from rmt_deploy.serving.ray import RayServeConfig, build_app

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    stop = threading.Event()
    counts = {"ok": 0, "failed": 0}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = RayServeConfig(bundle=str(one_task_bundle), min_replicas=1, max_replicas=2,
                                target_ongoing_requests=1, replica_cpus=0.5, threads=1)
        serve.run(build_app(config), name="rmt", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v2/models/rmt"
        image = np.zeros((1, 32, 32, 3), np.uint8)
        body = {"inputs": [{"name": "task", "datatype": "BYTES", "shape": [1, 1], "data": ["solo"]},
                           {"name": "image", "datatype": "UINT8", "shape": [1, 32, 32, 3],
                            "data": image.reshape(-1).tolist()}]}

        def client() -> None:
            session = requests.Session()
            while not stop.is_set():
                ok = session.post(f"{url}/infer", json=body, timeout=60).status_code == 200
                counts["ok" if ok else "failed"] += 1

        threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
        for thread in threads:
            thread.start()
        assert len(requests.get(f"{url}/stats", timeout=30).json()["replicas"]) == 1
        deadline = time.time() + 150
        while len(requests.get(f"{url}/stats", timeout=30).json()["replicas"]) < 2:
            assert time.time() < deadline, f"no second replica after 150 s of load ({counts})"
            time.sleep(3)
        stop.set()
        for thread in threads:
            thread.join(60)
        assert counts["failed"] == 0 and counts["ok"] > 0, counts
    finally:
        stop.set()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
