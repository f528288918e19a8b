"""Engine on the torch backend matches the torch masked model per task, across switches."""
from __future__ import annotations

import numpy as np
import pytest

from rmt_deploy.runtime.engine import Engine

pytest.importorskip("torch")


def test_torch_backend_matches_masked_model_per_task_across_switches(torch_bundle, packs, images, reference):
    with Engine.load(torch_bundle, task="alpha", backend="torch", cache_tasks=1) as engine:
        assert engine.backend == "torch-cpu"
        assert engine.tasks == ["alpha", "beta", "gamma"]
        for task in ["alpha", "beta", "alpha", "gamma", "beta"]:
            engine.switch(task)
            got = engine.predict(images)
            assert got.task == task
            np.testing.assert_allclose(got.logits, reference(packs[task], images), rtol=1e-4, atol=1e-4)
            assert list(got.indices) == list(got.logits.argmax(1))
