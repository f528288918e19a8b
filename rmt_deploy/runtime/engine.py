"""Engine: one shared base, many tasks, switched in milliseconds.

    with Engine.load("bundle/", task="dtd") as engine:
        prediction = engine.predict(["cat.jpg"])
        engine.switch("eurosat")

The base runs on a backend (ONNX Runtime, TensorRT or torch); the masked weights come
from a TaskPool of `cache_tasks` dense buffers, each pinned by a run while it uses it,
so every prediction sees exactly one task's weights. Logits are computed here in
numpy from the shared embedding and the task's head. No torch import on this path.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from rmt_deploy.bundle import Bundle
from rmt_deploy.errors import ArtifactError, InputError, UnknownTaskError
from rmt_deploy.fingerprint import fingerprint_arrays, short
from rmt_deploy.integrity import REBUILD
from rmt_deploy.preprocess import ImageTransform, to_batch
from rmt_deploy.runtime import backends
from rmt_deploy.runtime.taskpool import BASE, TaskPool, TensorSpec
from rmt_deploy.runtime.tasks import ServingTask, TaskHead, read_task
from rmt_deploy.taskpack import TaskPack

__all__ = ["Engine", "Prediction"]


@dataclass(frozen=True)
class Prediction:
    """Per-image results of one task: logits and probabilities [N, C], top-1 indices and labels."""

    task: str
    logits: np.ndarray
    probs: np.ndarray
    indices: np.ndarray
    labels: list[str]
    class_names: tuple[str, ...]

    def top_k(self, k: int = 5) -> list[list[tuple[str, float]]]:
        """For each image, the k most probable (class name, probability) pairs."""
        k = max(1, min(int(k), self.probs.shape[1]))
        order = np.argsort(-self.probs, axis=1, kind="stable")[:, :k]
        return [[(self.class_names[j], float(row[j])) for j in idx] for row, idx in zip(self.probs, order)]


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=1, keepdims=True)
    return shifted


def _check_legacy_base(bundle: Bundle, specs: list[TensorSpec], arrays: dict[str, np.ndarray],
                       digest: str | None) -> None:
    """A 0.1 bundle records no file hashes: check the base values read against its base_weights_sha256,
    else against the fingerprint (fp32 open_clip layout only); refuse when neither is possible."""
    manifest = bundle.manifest
    if manifest.base_weights_sha256:
        if digest != manifest.base_weights_sha256:
            raise ArtifactError(f"{bundle.root / manifest.base_weights}: sha256 {str(digest)[:12]}... differs "
                                f"from the manifest's {manifest.base_weights_sha256[:12]}...: the file is damaged "
                                f"or altered; {REBUILD}")
        return
    if any(s.perm is not None or s.dtype != np.float32 for s in specs):
        raise ArtifactError(f"{bundle.root}: this rmt-deploy 0.1 bundle records no hash of its fp16 base weights, "
                            f"so they cannot be checked; {REBUILD}")
    found = fingerprint_arrays(manifest.model_name, {s.tensor: arrays[s.key] for s in specs})
    if found != manifest.fingerprint:
        raise ArtifactError(
            f"{bundle.root}: the base weights ({manifest.base_weights or 'base values'}) give fingerprint "
            f"{short(found)}, the manifest says {short(manifest.fingerprint)}: a bundle file is damaged or "
            f"altered; {REBUILD}"
        )


def _make_pool(bundle: Bundle, impl: Any, cache_tasks: int, threads: int | None) -> TaskPool:
    """The task pool, its first buffer filled with the base values (hash-checked while read)."""
    digest: list[str | None] = [None]

    def fill(arrays: dict[str, np.ndarray]) -> None:
        reader = getattr(impl, "fill_base", None)
        if reader is not None:
            digest[0] = reader(arrays)
        else:
            for spec in impl.specs:
                impl.read_base(spec, arrays[spec.key])

    pool = TaskPool(impl.specs, fill, cache_tasks, workers=threads)
    if impl.base_file is not None and not bundle.verified:
        try:
            _check_legacy_base(bundle, impl.specs, pool.base_arrays(), digest[0])
        except BaseException:
            pool.close()
            raise
    return pool


class Engine:
    """Serves the tasks of one bundle from one shared base; thread-safe."""

    BASE = BASE  # pseudo-task for `embed`: the unmasked base weights

    def __init__(self, bundle: Bundle, backend: Any, pool: TaskPool):
        self._bundle = bundle
        self._backend = backend
        self._pool = pool
        self._heads: dict[str, TaskHead] = {}
        self._transform = ImageTransform.from_config(bundle.manifest.preprocess)
        self._max_batch = max(1, int(bundle.manifest.max_batch))
        self._lock = threading.Lock()        # engine state: heads, current task, closed
        self._run_lock = threading.Lock()    # serialises runs on non-concurrent backends
        self._task: str | None = None
        self._closed = False

    @classmethod
    def load(cls, bundle: str | os.PathLike | Bundle, task: str | None = None, backend: str = "auto",
             device: str = "cpu", cache_tasks: int = 2, threads: int | None = None) -> "Engine":
        """Open a bundle, load its tasks compactly and make `task` (default: the first) current."""
        if not isinstance(bundle, Bundle):
            bundle = Bundle.open(bundle)
        if task is not None:
            bundle.task_path(task)  # unknown task: fail before the expensive part
        impl = backends.create(bundle, backend, device, threads)
        pool = None
        try:
            pool = _make_pool(bundle, impl, cache_tasks, threads)
            engine = cls(bundle, impl, pool)
            engine._load_tasks(task)
            return engine
        except BaseException:
            if pool is not None:
                pool.close()
            impl.close()
            raise

    # ------------------------------------------------------------ properties

    @property
    def backend(self) -> str:
        """Which backend runs the base, e.g. 'onnxruntime-cpu', 'tensorrt', 'torch-cpu'."""
        return self._backend.name

    @property
    def tasks(self) -> list[str]:
        with self._lock:  # add_task may be inserting a head
            return list(self._heads)

    @property
    def task(self) -> str | None:
        """The task `predict` uses when none is given."""
        return self._task

    @property
    def bundle(self) -> Bundle:
        return self._bundle

    @property
    def cache_stats(self) -> dict[str, int]:
        """Task-pool counters: hits (cached switches), misses (in-place rewrites), waits, allocations."""
        return dict(vars(self._pool.stats))

    @property
    def resident_tasks(self) -> list[str]:
        """Tasks whose dense weights are in the pool now, most recently used first."""
        return self._pool.resident()

    # ------------------------------------------------------------ tasks

    def _load_tasks(self, current: str | None) -> None:
        """Register the bundle's tasks and switch to `current` (default: the first)."""
        bundle = self._bundle
        for name in bundle.tasks:
            self._register(read_task(bundle.task_path(name), bundle.manifest.fingerprint, self._shapes(),
                                     bundle.manifest.embed_dim, bundle.record(bundle.task_relative(name)), name))
        current = current if current is not None else (bundle.tasks[0] if bundle.tasks else None)
        if current is not None:
            self.switch(current)

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        return {t.name: tuple(t.shape) for t in self._bundle.manifest.masked_tensors}

    def _register(self, task: ServingTask) -> None:
        name = task.head.name
        with self._lock:
            if name in self._heads:
                raise InputError(f"task {name!r} is already loaded; give the new version another name")
            zeros = {s.key: s.stored_indices(task.zeros[s.tensor]) for s in self._backend.specs}
            self._pool.add(name, zeros)
            self._heads[name] = task.head

    def add_task(self, source: str | os.PathLike | TaskPack) -> str:
        """Hot-add a task from a .rmtask path or a TaskPack (fingerprint-checked); returns its name."""
        self._check_open()
        manifest = self._bundle.manifest
        task = read_task(source, manifest.fingerprint, self._shapes(), manifest.embed_dim)
        self._register(task)
        return task.head.name

    def _head(self, task: str | None) -> TaskHead:
        name = self._task if task is None else task
        if name is None:
            raise InputError("no task selected: pass task=... or call engine.switch(task) first "
                             f"(available: {', '.join(self.tasks) or 'none'})")
        head = self._heads.get(name)
        if head is None:
            raise UnknownTaskError(f"task {name!r} not loaded (available: {', '.join(self.tasks) or 'none'})")
        return head

    def switch(self, task: str) -> None:
        """Make `task` current and its weights resident (a rebind if cached, an in-place rewrite if not)."""
        self._check_open()
        self._head(task)
        lease = self._pool.acquire(task)
        try:
            prepare = getattr(self._backend, "prepare", None)
            if prepare is not None:  # device copy or refit now, not on the next predict
                if self._backend.concurrent:
                    prepare(lease)
                else:
                    with self._run_lock:
                        prepare(lease)
        finally:
            self._pool.release(lease)
        self._task = task

    # ------------------------------------------------------------ inference

    def predict(self, images: Any, task: str | None = None) -> Prediction:
        """Classify images with one task (default: the current one), atomically.

        `images`: paths, PIL images, uint8 HWC arrays (one or a list), or a float32 NCHW
        batch already preprocessed. Batches larger than the bundle's max batch are split.
        """
        self._check_open()
        head = self._head(task)
        batch = to_batch(images, self._transform)
        embeddings = self.embed(batch, head.name)
        logits = head.logits(embeddings)
        probs = _softmax(logits.copy())
        indices = logits.argmax(axis=1)
        labels = [head.class_names[i] for i in indices]
        return Prediction(head.name, logits, probs, indices, labels, head.class_names)

    def embed(self, batch: np.ndarray, task: str) -> np.ndarray:
        """L2-normalised image embeddings of a preprocessed batch under one task's weights
        (or the unmasked base weights when task is `Engine.BASE`)."""
        self._check_open()
        if task != BASE:
            self._head(task)
        lease = self._pool.acquire(task)
        try:
            parts = []
            for start in range(0, batch.shape[0], self._max_batch):
                chunk = batch[start:start + self._max_batch]
                if self._backend.concurrent:
                    parts.append(self._backend.run(chunk, lease))
                else:
                    with self._run_lock:
                        parts.append(self._backend.run(chunk, lease))
        finally:
            self._pool.release(lease)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    # ------------------------------------------------------------ lifetime

    def _check_open(self) -> None:
        if self._closed:
            raise InputError("this engine is closed; load a new one with Engine.load(...)")

    def close(self) -> None:
        """Release the backend and the pool's buffers. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.close()  # waits for runs in flight
        with self._run_lock:
            self._backend.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"task={self._task!r}, tasks={len(self._heads)}"
        return f"Engine({self._bundle.root}, backend={self.backend!r}, {state})"
