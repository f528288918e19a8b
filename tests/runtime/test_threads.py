"""Many threads predicting and switching: every result equals the single-threaded one for its task."""
from __future__ import annotations

import random
import threading

import numpy as np
import pytest

from rmt_deploy.runtime.engine import Engine


def _stress(engine: Engine, images: np.ndarray, threads: int = 4, calls: int = 8) -> None:
    expected = {task: engine.predict(images, task=task).logits for task in engine.tasks}
    failures: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(calls):
            try:
                if rng.random() < 0.3:
                    engine.switch(rng.choice(engine.tasks))
                    continue
                task = rng.choice(engine.tasks)
                got = engine.predict(images, task=task)
                if got.task != task or not np.allclose(got.logits, expected[task], rtol=1e-6, atol=1e-6):
                    failures.append(f"thread {seed}: task {task} result differs")
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                failures.append(f"thread {seed}: {type(exc).__name__}: {exc}")

    pool = [threading.Thread(target=worker, args=(seed,)) for seed in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(120)
    hung = [thread.name for thread in pool if thread.is_alive()]
    assert not hung, f"threads still running after 120 s: {hung}"
    assert not failures, failures


@pytest.mark.parametrize("cache_tasks", [1, 2])
def test_onnxruntime_stress_each_result_matches_its_task(onnx_bundle, images, cache_tasks):
    pytest.importorskip("onnxruntime")
    with Engine.load(onnx_bundle, cache_tasks=cache_tasks, threads=1) as engine:
        _stress(engine, images)


def test_torch_stress_each_result_matches_its_task(torch_bundle, images):
    pytest.importorskip("torch")
    with Engine.load(torch_bundle, backend="torch", cache_tasks=2) as engine:
        _stress(engine, images, threads=3, calls=6)
