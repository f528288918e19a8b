"""Engine on ONNX Runtime (CPU) matches the torch masked model and the folded models, per task."""
from __future__ import annotations

import numpy as np
import pytest

from rmt_deploy.runtime.engine import Engine

pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("cache_tasks", [1, 2])
def test_ort_matches_torch_masked_model_per_task_across_switches(onnx_bundle, packs, images, reference,
                                                                 cache_tasks):
    with Engine.load(onnx_bundle, task="alpha", cache_tasks=cache_tasks, threads=1) as engine:
        assert engine.backend == "onnxruntime-cpu"
        for task in ["alpha", "beta", "alpha", "gamma", "beta", "alpha"]:
            engine.switch(task)
            got = engine.predict(images)
            assert got.task == task and got.logits.shape == (len(images), len(packs[task].class_names))
            np.testing.assert_allclose(got.logits, reference(packs[task], images), rtol=1e-4, atol=1e-4)
        assert len(engine.resident_tasks) == cache_tasks


def test_ort_matches_folded_models(onnx_bundle, images):
    import onnxruntime as ort

    with Engine.load(onnx_bundle, threads=1) as engine:
        for task in engine.tasks:
            folded = ort.InferenceSession(str(onnx_bundle.folded_path(task)), providers=["CPUExecutionProvider"])
            expected = folded.run(None, {"image": images})[0]
            np.testing.assert_allclose(engine.predict(images, task=task).logits, expected, rtol=1e-5, atol=1e-4)


def test_bundle_with_initializer_defaults_is_fed_the_same(make_bundle, task_specs, packs, images, reference):
    """masked_inputs="defaults": ORT lists the masked inputs as overridable initializers; feeding still wins."""
    bundle = make_bundle(task_specs.three[:2], mode="shared", masked_inputs="defaults", max_batch=4)
    with Engine.load(bundle, cache_tasks=1, threads=1) as engine:
        for task in ["beta", "alpha", "beta"]:
            np.testing.assert_allclose(engine.predict(images, task=task).logits, reference(packs[task], images),
                                       rtol=1e-4, atol=1e-4)


def test_prediction_carries_the_embeddings_its_logits_came_from(onnx_bundle, packs, images):
    with Engine.load(onnx_bundle, threads=1) as engine:
        got = engine.predict(images, task="beta")
        np.testing.assert_array_equal(got.embeddings, engine.embed(images, "beta"))
        np.testing.assert_allclose(np.linalg.norm(got.embeddings, axis=1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(got.logits, packs["beta"].logit_scale * got.embeddings @ packs["beta"].head.T,
                                   rtol=1e-5, atol=1e-5)
