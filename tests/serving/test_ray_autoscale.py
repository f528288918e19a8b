"""Autoscaling on a real local Ray cluster: min 1, max 2 replicas, target 1 ongoing request; under
sustained load from 8 clients Serve adds the second replica and no request fails meanwhile. Serve's
upscale delay and look-back window (30 s each by default) are shortened to 2 s here and its metrics
interval to 0.5 s: the same decision, made sooner."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install 'rmt-deploy[ray]')")
requests = pytest.importorskip("requests")

from rmt_deploy.serving.ray_config import RayServeConfig  # noqa: E402

pytestmark = pytest.mark.slow


class QuickUpscale(RayServeConfig):
    """RayServeConfig whose autoscaling_config also sets Serve's upscale delay, look-back and metrics interval."""

    @property
    def autoscaling(self):
        return {**super().autoscaling, "upscale_delay_s": 2.0, "look_back_period_s": 2.0, "metrics_interval_s": 0.5}


@pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning")  # still honoured by Ray 2.x
def test_load_adds_a_replica_within_the_autoscaling_range(ray_bundle, ray_cluster):
    config = QuickUpscale(bundle=str(ray_bundle), min_replicas=1, max_replicas=2, target_ongoing_requests=1,
                          replica_cpus=0.5, threads=1)
    stop = threading.Event()
    counts = {"ok": 0, "failed": 0}
    with ray_cluster.deploy(config):
        url = f"{ray_cluster.url}/v2/models/rmt"
        image = np.zeros((1, 32, 32, 3), np.uint8)
        body = {"inputs": [{"name": "task", "datatype": "BYTES", "shape": [1, 1], "data": ["task0"]},
                           {"name": "image", "datatype": "UINT8", "shape": [1, 32, 32, 3],
                            "data": image.reshape(-1).tolist()}]}

        def client() -> None:
            session = requests.Session()
            while not stop.is_set():
                ok = session.post(f"{url}/infer", json=body, timeout=60).status_code == 200
                counts["ok" if ok else "failed"] += 1

        threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
        try:
            for thread in threads:
                thread.start()
            assert len(requests.get(f"{url}/stats", timeout=30).json()["replicas"]) == 1
            deadline = time.time() + 150
            while len(requests.get(f"{url}/stats", timeout=30).json()["replicas"]) < 2:
                assert time.time() < deadline, f"no second replica after 150 s of load ({counts})"
                time.sleep(0.5)
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
        assert counts["failed"] == 0 and counts["ok"] > 0, counts
