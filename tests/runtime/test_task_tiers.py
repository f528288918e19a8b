"""The task store behind the engine: lazy reading, tiers, hot add/remove, exact outputs under churn."""
from __future__ import annotations

import random
import threading

import numpy as np
import pytest

from rmt_deploy.errors import ArtifactError, InputError, UnknownTaskError
from rmt_deploy.runtime.engine import Engine
from rmt_deploy.runtime.task_tiers import TaskStore

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def dense(onnx_bundle):
    """dense(pack, images) -> logits of base.onnx fed base * mask directly: the folded model's arithmetic."""
    import onnxruntime as ort
    from safetensors.numpy import load_file

    manifest = onnx_bundle.manifest
    session = ort.InferenceSession(str(onnx_bundle.root / manifest.files["onnx"]["base"]),
                                   providers=["CPUExecutionProvider"])
    weights = load_file(str(onnx_bundle.root / manifest.base_weights))

    def logits(pack, images):
        feeds = {manifest.input_name: images}
        for t in manifest.masked_tensors:
            base = weights[t.name] if t.name in weights else weights[t.input_name]
            feeds[t.input_name] = base * pack.masks[t.name]
        emb = session.run([manifest.output_name], feeds)[0]
        return pack.logit_scale * emb @ pack.head.T

    return logits


def _rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


@pytest.fixture
def bundle_copy(onnx_bundle, copy_bundle, tmp_path):
    return copy_bundle(onnx_bundle.root, tmp_path)


def test_load_reads_only_the_current_task(bundle_copy, images):
    (bundle_copy / "tasks" / "gamma.rmtask").unlink()  # never read unless gamma is used
    with Engine.load(bundle_copy, task="beta", threads=1) as engine:
        assert [engine.tier(t) for t in ("alpha", "beta", "gamma")] == ["disk", "resident", "disk"]
        stats = engine.store_stats
        assert (stats["tasks"], stats["disk"], stats["resident"]) == (3, 2, 1)
        assert engine.predict(images, task="alpha").task == "alpha"
        with pytest.raises(ArtifactError, match="gamma.rmtask: bundle file missing"):
            engine.predict(images, task="gamma")


def test_tiers_follow_use_and_budgets(onnx_bundle, packs, images, dense):
    with Engine.load(onnx_bundle, task="alpha", threads=1, cache_tasks=1, warm_bytes=1 << 30) as engine:
        engine.switch("beta")  # alpha leaves the only buffer, its zero indices stay decoded
        assert (engine.tier("alpha"), engine.tier("beta"), engine.tier("gamma")) == ("warm", "resident", "disk")
    with Engine.load(onnx_bundle, task="alpha", threads=1, cache_tasks=1, warm_bytes=0) as engine:
        engine.switch("beta")
        assert engine.tier("alpha") == "cold"  # nothing may stay decoded: encoded masks + head only
        stats = engine.store_stats
        blobs = sum(len(b) for b in onnx_bundle.read_task("alpha").blobs.values()) + packs["alpha"].head.nbytes
        beta = sum(len(b) for b in onnx_bundle.read_task("beta").blobs.values()) + packs["beta"].head.nbytes
        assert stats["cold_bytes"] == blobs + beta and stats["warm_bytes"] == 0
        for task in ("alpha", "gamma", "beta", "alpha"):  # every switch from cold or disk decodes again
            assert _rel_l2(engine.predict(images, task=task).logits, dense(packs[task], images)) <= 1e-6


def test_warm_budget_keeps_the_most_recently_used(onnx_bundle):
    with Engine.load(onnx_bundle, task="alpha", threads=1, cache_tasks=1) as probe:
        one_task = probe.store_stats["warm_bytes"]
    assert one_task > 0
    with Engine.load(onnx_bundle, task="alpha", threads=1, cache_tasks=1, warm_bytes=int(one_task * 2.5)) as engine:
        for task in ("beta", "gamma", "alpha", "beta"):
            engine.switch(task)
        assert engine.store_stats["warm_bytes"] <= engine.store_stats["warm_budget"]
        assert engine.tier("gamma") == "cold" and engine.tier("alpha") == "warm"  # gamma least recently used


def test_remove_task_waits_for_runs_and_frees_the_task(onnx_bundle, images, make_taskpack, dense):
    with Engine.load(onnx_bundle, threads=1, cache_tasks=2) as engine:
        engine.switch("beta")
        assert engine.task == "beta"
        stop, results, errors = threading.Event(), [], []

        def predict_forever():
            while not stop.is_set():
                try:
                    results.append(engine.predict(images, task="beta").task)
                except UnknownTaskError as exc:
                    errors.append(str(exc))
                    return

        runner = threading.Thread(target=predict_forever)
        runner.start()
        while not results:
            pass
        engine.remove_task("beta")
        runner.join(30)
        stop.set()
        assert not runner.is_alive() and len(errors) == 1 and "'beta' not loaded" in errors[0]
        assert set(results) == {"beta"}
        assert engine.tasks == ["alpha", "gamma"] and "beta" not in engine.resident_tasks
        assert engine.task is None and engine.store_stats["tasks"] == 2
        with pytest.raises(InputError, match="no task selected"):
            engine.predict(images)
        with pytest.raises(UnknownTaskError, match="available: alpha, gamma"):
            engine.remove_task("beta")
        newer = make_taskpack("beta", seed=99, zeros=0.3)  # a new version under the old name
        engine.add_task(newer)
        assert _rel_l2(engine.predict(images, task="beta").logits, dense(newer, images)) <= 1e-6


def test_store_refuses_bad_budgets_and_duplicate_names():
    with pytest.raises(InputError, match="warm_bytes=-1 must be an integer >= 0"):
        TaskStore(lambda task: {}, warm_bytes=-1)
    store = TaskStore(lambda task: {})
    store.add("a", lambda: None)
    with pytest.raises(InputError, match="already loaded"):
        store.add("a", lambda: None)
    with pytest.raises(UnknownTaskError, match=r"'b' not loaded \(available: a\)"):
        store.head("b")


@pytest.mark.parametrize("seed", range(10))
def test_random_switches_adds_and_removes_with_concurrent_predicts_stay_exact(onnx_bundle, packs, make_taskpack,
                                                                              images, dense, seed):
    """After any sequence of switches, adds and removes, every answer is its task's folded output."""
    rng = random.Random(seed)
    extra = {f"extra{i}": make_taskpack(f"extra{i}", seed=100 + i, zeros=0.05 + 0.1 * i) for i in range(3)}
    every = {**packs, **extra}
    expected = {name: dense(pack, images) for name, pack in every.items()}
    removed: set[str] = set()
    failures: list[str] = []
    with Engine.load(onnx_bundle, threads=1, cache_tasks=rng.choice([1, 2]),
                     warm_bytes=rng.choice([0, 200_000, 1 << 30])) as engine:
        stop = threading.Event()

        def client(worker: int) -> None:
            local = random.Random(seed * 10 + worker)
            while not stop.is_set():
                task = local.choice(sorted(every))
                try:
                    got = engine.predict(images, task=task)
                except UnknownTaskError:
                    if task not in removed and task not in extra:
                        failures.append(f"{task} unknown but never removed")
                    continue
                error = _rel_l2(got.logits, expected[task])
                if got.task != task or error > 1e-6:
                    failures.append(f"{task}: answered as {got.task}, rel L2 {error:.2e}")

        clients = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for thread in clients:
            thread.start()
        try:
            for _ in range(25):
                loaded = engine.tasks
                action = rng.choice(["switch", "switch", "add", "remove"])
                if action == "add" and set(every) - set(loaded):
                    name = rng.choice(sorted(set(every) - set(loaded)))
                    engine.add_task(every[name])
                elif action == "remove" and len(loaded) > 1:
                    name = rng.choice(loaded)
                    removed.add(name)
                    engine.remove_task(name)
                else:
                    engine.switch(rng.choice(loaded))
                    got = engine.predict(images)
                    if _rel_l2(got.logits, expected[got.task]) > 1e-6:
                        failures.append(f"current task {got.task} differs")
        finally:
            stop.set()
            for thread in clients:
                thread.join(30)
        assert len(engine.resident_tasks) <= engine._pool.capacity
        assert engine.store_stats["warm_bytes"] <= engine.store_stats["warm_budget"]
    assert not failures, failures[:5]


def test_cache_heads_hold_float32_keys_only_while_in_use(onnx_bundle, make_taskpack, images):
    """A tip-adapter head's prepared math (float32 keys, twice the stored bytes) is kept for the
    `cache_tasks` most recently predicted tasks, not by every stored task; logits stay the formula's."""
    from rmt_deploy.artifacts.heads import Cache, logits

    embed_dim = onnx_bundle.manifest.embed_dim
    engine = Engine.load(onnx_bundle.root, cache_tasks=1)
    try:
        packs = []
        for i in range(3):
            pack = make_taskpack(f"tip{i}", seed=30 + i, classes=3)
            keys = np.random.default_rng(i).standard_normal((6, embed_dim)).astype(np.float32)
            keys /= np.linalg.norm(keys, axis=1, keepdims=True)
            pack.head_kind, pack.cache = "tip-adapter", Cache.build(keys, np.arange(6) % 3, 3.0, 5.0, 3, embed_dim)
            engine.add_task(pack)
            packs.append(pack)
        for pack in packs + packs[:1]:
            got = engine.predict(images, task=pack.name)
            np.testing.assert_allclose(got.logits, logits(got.embeddings, pack.head, pack.logit_scale, pack.cache),
                                       rtol=1e-5, atol=1e-4)
            assert list(engine._maths) == [pack.name]  # only the task in use keeps its prepared head
        assert all(engine._store.head(p.name)._math is None for p in packs)
        engine.remove_task("tip0")
        assert not engine._maths
    finally:
        engine.close()
