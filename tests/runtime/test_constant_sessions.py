"""Constant sessions: a resident task's own ONNX Runtime session over its pool buffer, made in the background."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from rmt_deploy.runtime.backends.constant_sessions import ASK_AFTER_USES, ConstantSessionWarning
from rmt_deploy.runtime.engine import Engine

pytest.importorskip("onnxruntime")

WORKER = "rmt-constant-sessions"


@pytest.fixture(scope="module")
def fed_logits(onnx_bundle, images):
    """Each task's logits through the shared graph with its weights fed (constant sessions off)."""
    with Engine.load(onnx_bundle, threads=1, constant_sessions=False) as engine:
        assert engine.session_stats["on"] is False
        return {task: engine.predict(images, task=task).logits for task in engine.tasks}


def _close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _serve(engine, images, task, want=None):
    """The runs after which a task's session is asked for (each checked against `want`)."""
    for _ in range(ASK_AFTER_USES):
        got = engine.predict(images, task=task).logits
        if want is not None:
            _close(got, want)


def test_resident_tasks_get_sessions_that_answer_as_the_fed_graph_and_the_folded_model(onnx_bundle, images,
                                                                                       fed_logits):
    import onnxruntime as ort

    with Engine.load(onnx_bundle, task="alpha", threads=1, constant_sessions=2) as engine:
        for task in ("alpha", "beta"):
            _serve(engine, images, task, fed_logits[task])  # sessions asked for, not waited for
        assert engine.wait_ready(60)
        assert engine.session_stats == {"on": True, "ready": 2, "made": 2, "limit": 2, "off_because": None}
        for task in ("alpha", "beta"):
            got = engine.predict(images, task=task).logits
            _close(got, fed_logits[task])
            folded = ort.InferenceSession(str(onnx_bundle.folded_path(task)), providers=["CPUExecutionProvider"])
            np.testing.assert_allclose(got, folded.run(None, {"image": images})[0], rtol=1e-5, atol=1e-4)


def test_a_task_served_once_per_stay_in_its_buffer_costs_no_session(onnx_bundle, images, fed_logits):
    """Round-robin over more tasks than buffers: every task is evicted after one run; no session is made."""
    with Engine.load(onnx_bundle, task="alpha", cache_tasks=1, threads=1) as engine:
        for task in ["beta", "gamma", "alpha"] * 3:
            _close(engine.predict(images, task=task).logits, fed_logits[task])
        assert engine.wait_ready(60) and engine.session_stats["made"] == 0


def test_a_rewritten_buffer_never_answers_through_the_session_of_its_old_task(onnx_bundle, images, fed_logits):
    """One buffer: every switch rewrites it, and the task's first answers come before its new session exists."""
    with Engine.load(onnx_bundle, task="alpha", cache_tasks=1, threads=1) as engine:
        for task in ("beta", "alpha", "gamma", "alpha", "beta"):
            assert engine.wait_ready(60)  # the previous task's session is ready: it must not be used now
            _serve(engine, images, task, fed_logits[task])
            assert engine.wait_ready(60) and engine.session_stats["ready"] == 1
            _close(engine.predict(images, task=task).logits, fed_logits[task])
        assert engine.session_stats["made"] == 5


def test_runs_on_many_threads_while_sessions_are_made_each_see_one_task(onnx_bundle, images, fed_logits):
    tasks = ["alpha", "beta", "gamma"]
    failures: list[str] = []
    with Engine.load(onnx_bundle, cache_tasks=2, threads=1, constant_sessions=2) as engine:
        def work(seed: int) -> None:
            rng = np.random.default_rng(seed)
            for _ in range(25):
                task = tasks[rng.integers(len(tasks))]
                got = engine.predict(images, task=task).logits
                if not np.allclose(got, fed_logits[task], rtol=1e-6, atol=1e-6):
                    failures.append(task)
        _serve(engine, images, "alpha")  # alpha's session is asked for: made while the threads run
        threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for task in ("beta", "gamma"):  # gamma's session needs beta's buffer: only gamma's is held after
            _serve(engine, images, task, fed_logits[task])
            assert engine.wait_ready(60)
        assert engine.session_stats["made"] >= 1 and engine.session_stats["ready"] >= 1
        _close(engine.predict(images, task="gamma").logits, fed_logits["gamma"])
    assert failures == []


def _damage_constant_graph(root) -> None:
    path = root / "base_constant.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_constant_graph_turns_constant_sessions_off_with_one_warning(onnx_bundle, images, fed_logits,
                                                                               copy_bundle, tmp_path):
    root = copy_bundle(onnx_bundle.root, tmp_path)
    _damage_constant_graph(root)
    with pytest.warns(ConstantSessionWarning, match=r"base_constant.onnx: constant sessions are off .*sha256"):
        with Engine.load(root, task="alpha", threads=1) as engine:
            _serve(engine, images, "alpha", fed_logits["alpha"])
            assert engine.wait_ready(60)
            stats = engine.session_stats
            for task in engine.tasks:
                _serve(engine, images, task, fed_logits[task])
            assert engine.wait_ready(60) and engine.session_stats["made"] == 0
    assert stats["on"] is False and "sha256" in stats["off_because"]


def test_a_constant_graph_changed_after_load_is_never_used(onnx_bundle, images, fed_logits, copy_bundle, tmp_path):
    """alpha's session was made from the verified graph and stays; beta's would read the changed file: none."""
    root = copy_bundle(onnx_bundle.root, tmp_path)
    with Engine.load(root, task="alpha", threads=1, constant_sessions=2) as engine:
        _serve(engine, images, "alpha")
        assert engine.wait_ready(60) and engine.session_stats["ready"] == 1
        _damage_constant_graph(root)
        with pytest.warns(ConstantSessionWarning):
            _serve(engine, images, "beta", fed_logits["beta"])
            assert engine.wait_ready(60)
        assert engine.session_stats["made"] == 1 and "sha256" in engine.session_stats["off_because"]
        for task in ("alpha", "beta", "gamma"):
            _close(engine.predict(images, task=task).logits, fed_logits[task])


def test_a_bundle_without_a_constant_graph_is_served_through_the_fed_graph(onnx_bundle, images, fed_logits,
                                                                         copy_bundle, tmp_path):
    """A bundle exported before constant graphs (format version 2) names none."""
    root = copy_bundle(onnx_bundle.root, tmp_path)
    doc = json.loads((root / "manifest.json").read_text())
    del doc["files"]["onnx"]["constant"], doc["checksums"]["base_constant.onnx"]
    doc["version"] = 2
    (root / "manifest.json").write_text(json.dumps(doc))
    (root / "base_constant.onnx").unlink()
    with Engine.load(root, threads=1) as engine:
        for task in engine.tasks:
            _serve(engine, images, task)
            np.testing.assert_array_equal(engine.predict(images, task=task).logits, fed_logits[task])
        assert engine.wait_ready(1)
        assert engine.session_stats["on"] is False and "no constant graph" in engine.session_stats["off_because"]


def test_closing_while_a_session_is_made_stops_the_worker(onnx_bundle, images):
    for _ in range(5):
        engine = Engine.load(onnx_bundle, task="alpha", threads=1)
        _serve(engine, images, "alpha")  # alpha's session is being made now
        engine.close()
        assert not [t for t in threading.enumerate() if t.name == WORKER and t.is_alive()]


@pytest.mark.parametrize("kind", ["fp16", "defaults"])
def test_constant_sessions_of_fp16_and_initializer_default_bundles(make_bundle, task_specs, images, kind):
    masked_inputs = "defaults" if kind == "defaults" else "required"
    bundle = make_bundle(task_specs.two, mode="shared", fp16=kind == "fp16", masked_inputs=masked_inputs)
    with Engine.load(bundle, threads=1, constant_sessions=False) as fed:
        want = {task: fed.predict(images, task=task).logits for task in fed.tasks}
    with Engine.load(bundle, threads=1, constant_sessions=2) as engine:
        for task in engine.tasks:
            _serve(engine, images, task)
            assert engine.wait_ready(60)
            np.testing.assert_allclose(engine.predict(images, task=task).logits, want[task], rtol=1e-3, atol=1e-3)
        assert engine.session_stats["made"] == 2 and engine.session_stats["on"]


def test_export_writes_a_constant_graph_whose_weights_are_stored_nowhere(onnx_bundle):
    import onnx

    model = onnx.load(str(onnx_bundle.root / "base_constant.onnx"), load_external_data=False)
    masked = {t.input_name for t in onnx_bundle.manifest.masked_tensors}
    assert [i.name for i in model.graph.input] == ["image"]
    external = {t.name: {e.key: e.value for e in t.external_data} for t in model.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL}
    assert set(external) == masked
    assert {e["location"] for e in external.values()} == {"rmt-deploy-supplied-at-load"}
    assert not (onnx_bundle.root / "rmt-deploy-supplied-at-load").exists()


def test_engine_load_without_constant_sessions_says_why(onnx_bundle):
    with Engine.load(onnx_bundle, threads=1, constant_sessions=False) as engine:
        assert "constant_sessions=0" in engine.session_stats["off_because"]


def test_sessions_beyond_the_limit_wait_for_a_held_one_to_go(onnx_bundle, images, fed_logits):
    """The default limit is one session: beta, served while alpha holds it, gets none; once alpha's buffer is
    rewritten (gamma), alpha's session goes and gamma, served twice, takes its place."""
    with Engine.load(onnx_bundle, task="alpha", cache_tasks=2, threads=1) as engine:
        for task, made in (("alpha", 1), ("beta", 1), ("gamma", 2)):
            _serve(engine, images, task, fed_logits[task])
            assert engine.wait_ready(60)
            assert engine.session_stats["made"] == made and engine.session_stats["ready"] == 1
        assert engine.session_stats["limit"] == 1
        for task in ("beta", "gamma"):
            _close(engine.predict(images, task=task).logits, fed_logits[task])


@pytest.mark.parametrize("value", [-1, "2", 1.5])
def test_a_bad_session_limit_is_one_line(onnx_bundle, value):
    from rmt_deploy.errors import InputError

    with pytest.raises(InputError, match=rf"constant_sessions={value!r} must be an integer >= 0"):
        Engine.load(onnx_bundle, constant_sessions=value)
