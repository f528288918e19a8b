"""Issue #22: `rmt-deploy serve` (Triton) of a non-ViT tower family's bundle answers as Engine.predict does
(FastViT / MobileCLIP2, tests/families.py; the Ray Serve twin on ConvNeXt is in test_ray_serve.py)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("timm")
pytest.importorskip("tritonclient.http")

MODEL = "rmt-tiny-mobileclip2"


def test_triton_serves_every_task_of_a_mobileclip2_bundle_as_engine_predict(family, launch, clients):
    from PIL import Image

    from rmt_deploy.runtime.engine import Engine

    fam = family(MODEL)
    served = launch(fam.bundle)
    paths = fam.paths()
    images = [np.asarray(Image.open(p).convert("RGB")) for p in (paths[0], paths[-1])]  # 40x40, two classes
    module = clients.client_module("http")
    client = clients.make_client("http", served)
    try:
        with Engine.load(fam.bundle, threads=1) as engine:
            assert engine.tasks == ["a", "b"]
            answers = {}
            for task, image in zip(engine.tasks, images):
                got = clients.infer("http", client, clients.request(module, task, image))
                want = clients.expected(engine, task, image, clients.TOP_K)
                assert clients.mismatch(got, want) is None, (task, clients.mismatch(got, want))
                assert got["embedding"].shape == (1, engine.bundle.manifest.embed_dim)
                answers[task] = got
            # the two tasks' masks give the image different embeddings (each task really served)
            other = clients.infer("http", client, clients.request(module, "b", images[0]))
            assert np.abs(other["embedding"] - answers["a"]["embedding"]).max() > 1e-3
    finally:
        client.close()
