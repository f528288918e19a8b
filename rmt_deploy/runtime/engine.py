"""Engine: one shared base, many tasks, switched in milliseconds.

    with Engine.load("bundle/", task="dtd") as engine:
        prediction = engine.predict(["cat.jpg"])
        engine.switch("eurosat")

The base runs on a backend (ONNX Runtime, TensorRT or torch); the masked weights come
from a TaskPool of `cache_tasks` dense buffers, each pinned by a run while it uses it,
so every prediction sees exactly one task's weights. Tasks live in a TaskStore: listed
at load, read and verified at first use, kept encoded (cold) or decoded within
`warm_bytes` (warm). Logits are computed here in numpy from the shared embedding and
the task's head. No torch import on this path.

Bundle files changing under a live engine: the manifest, the base graph and the base
weights are read once at load and never again (no file stays mapped), so a later change,
truncation or deletion of them changes nothing: the engine answers as loaded. A task file is
read at the task's first use and checked against the size and sha256 the manifest had at
load; if it changed since, that task fails with an ArtifactError naming the file and saying
the bundle changed after load, and the other tasks keep answering. Tasks are the bundle's
tasks at load: `engine.tasks` does not follow `bundle add/remove` (so a task in use never
vanishes between two requests); asking for a task removed since load, or added since, is an
UnknownTaskError saying so and how to reload (Engine.load again, or `engine.add_task(path)`).
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Mapping

import numpy as np

from rmt_deploy.artifacts.bundle import Bundle
from rmt_deploy.artifacts.fingerprint import fingerprint_arrays, short
from rmt_deploy.artifacts.heads import HeadMath
from rmt_deploy.artifacts.integrity import REBUILD
from rmt_deploy.artifacts.masks import decode_zero_indices
from rmt_deploy.artifacts.task_file import TaskPack
from rmt_deploy.errors import ArtifactError, InputError, RmtError, UnknownTaskError
from rmt_deploy.runtime import backends
from rmt_deploy.runtime.backends import Backend
from rmt_deploy.runtime.backends.constant_sessions import session_limit
from rmt_deploy.runtime.buffer_pool import BASE, Lease, TaskPool, TensorSpec, ZeroSet
from rmt_deploy.runtime.preprocess import ImageTransform, to_batch
from rmt_deploy.runtime.task_reader import CompactTask, LazyZeros, TaskHead, read_compact
from rmt_deploy.runtime.task_tiers import DEFAULT_WARM_BYTES, RESIDENT, TaskStore, check_warm_bytes

__all__ = ["Engine", "Prediction"]


@dataclass(frozen=True)
class Prediction:
    """Per-image results of one task: logits and probabilities [N, C], top-1 indices and labels, and the
    L2-normalised image embeddings [N, D] under the task's weights."""

    task: str
    logits: np.ndarray
    probs: np.ndarray
    indices: np.ndarray
    labels: list[str]
    class_names: tuple[str, ...]
    embeddings: np.ndarray | None = None

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
    """A format-1 bundle records no file hashes: check the base values read against its base_weights_sha256,
    else against the fingerprint (fp32 open_clip layout only); refuse when neither is possible."""
    manifest = bundle.manifest
    if manifest.base_weights_sha256:
        if digest != manifest.base_weights_sha256:
            raise ArtifactError(f"{bundle.root / manifest.base_weights}: sha256 {str(digest)[:12]}... differs "
                                f"from the manifest's {manifest.base_weights_sha256[:12]}...: the file is damaged "
                                f"or altered; {REBUILD}")
        return
    if any(s.perm is not None or s.dtype != np.float32 for s in specs):
        raise ArtifactError(f"{bundle.root}: this format-1 bundle records no hash of its fp16 base weights, "
                            f"so they cannot be checked; {REBUILD}")
    found = fingerprint_arrays(manifest.model_name, {s.tensor: arrays[s.key] for s in specs})
    if found != manifest.fingerprint:
        raise ArtifactError(
            f"{bundle.root}: the base weights ({manifest.base_weights or 'base values'}) give fingerprint "
            f"{short(found)}, the manifest says {short(manifest.fingerprint)}: a bundle file is damaged or "
            f"altered; {REBUILD}"
        )


def _make_pool(bundle: Bundle, impl: Backend, cache_tasks: int, threads: int | None) -> TaskPool:
    """The task pool, its first buffer filled with the base values (hash-checked while read)."""
    def fill(arrays: dict[str, np.ndarray]) -> None:
        digest = impl.fill_base(arrays)
        if impl.base_file is not None and not bundle.verified:
            _check_legacy_base(bundle, impl.specs, arrays, digest)

    return TaskPool(impl.specs, fill, cache_tasks, workers=threads)


def _stored_zeros(pool: TaskPool, spec: TensorSpec, shape: tuple[int, ...], blob: bytes) -> ZeroSet:
    return pool.zero_set(spec.key, spec.stored_indices(decode_zero_indices(blob, shape)[1]))


class Engine:
    """Serves the tasks of one bundle from one shared base; thread-safe."""

    BASE = BASE  # pseudo-task for `embed`: the unmasked base weights

    def __init__(self, bundle: Bundle, backend: Backend, pool: TaskPool, warm_bytes: int = DEFAULT_WARM_BYTES):
        self._bundle = bundle
        self._backend = backend
        self._pool = pool
        self._store = TaskStore(self._decode, warm_bytes)
        self._shapes = {t.name: tuple(t.shape) for t in bundle.manifest.masked_tensors}
        self._membership = threading.Lock()  # add_task and remove_task, one at a time
        self._transform = ImageTransform.from_config(bundle.manifest.preprocess)
        self._max_batch = max(1, int(bundle.manifest.max_batch))
        self._lock = threading.Lock()        # engine state: current task, closed
        self._run_lock = threading.Lock()    # serialises runs on non-concurrent backends
        self._task: str | None = None
        self._closed = False
        self._maths: OrderedDict[str, tuple[TaskHead, HeadMath]] = OrderedDict()  # cache heads in use, LRU

    @classmethod
    def load(cls, bundle: str | os.PathLike | Bundle, task: str | None = None, backend: str = "auto",
             device: str = "cpu", cache_tasks: int = 2, threads: int | None = None,
             warm_bytes: int = DEFAULT_WARM_BYTES, constant_sessions: int | bool = True) -> "Engine":
        """Open a bundle, list its tasks (each read and verified at its first use) and make `task`
        (default: the first) current. `cache_tasks`: dense buffers (resident tasks); `warm_bytes`:
        budget for decoded tasks kept ready to switch to. `constant_sessions` (ONNX Runtime on CPU, bundles
        with a constant graph): how many resident tasks get a session of their own, made in the background
        once a task is served twice, whose masked weights are constants: as fast as the folded model, for
        one to two models' weights of memory each (True: 1, the hot task; 0 or False: off;
        docs/performance.md#constant-sessions)."""
        if not isinstance(bundle, Bundle):
            bundle = Bundle.open(bundle)
        if task is not None:
            bundle.task_path(task)  # unknown task: fail before the expensive part
        check_warm_bytes(warm_bytes)
        sessions = session_limit(constant_sessions)
        impl = backends.create(bundle, backend, device, threads)
        pool = None
        try:
            pool = _make_pool(bundle, impl, cache_tasks, threads)
            impl.attach_pool(pool, sessions)
            engine = cls(bundle, impl, pool, warm_bytes)
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
        return self._store.names

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

    @property
    def store_stats(self) -> dict[str, int]:
        """Tasks per tier (disk, cold, warm, resident) and the bytes the cold and warm forms hold."""
        stats = asdict(self._store.stats())
        stats[RESIDENT] = len(self._pool.resident())
        return stats

    @property
    def session_stats(self) -> dict[str, object]:
        """Constant sessions (ONNX Runtime on CPU): on, ready now, made so far, and why they are off."""
        stats = getattr(self._backend, "constant_stats", None)
        return dict(stats) if stats is not None else {"on": False, "ready": 0, "made": 0,
                                                      "off_because": f"the {self.backend} backend has none"}

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the backend's background work for the resident tasks (their constant sessions) is done;
        False if `timeout` seconds passed first. Predictions never wait for it: they use the shared graph."""
        self._check_open()
        return self._backend.wait_background(timeout)

    def tier(self, task: str) -> str:
        """Where `task` is held now: 'resident', 'warm', 'cold' or 'disk' (listed, not read yet)."""
        tier = self._store.tier(task)
        return RESIDENT if self._pool.holds(task) else tier

    # ------------------------------------------------------------ tasks

    def _load_tasks(self, current: str | None) -> None:
        """List the bundle's tasks (nothing read) and switch to `current` (default: the first)."""
        for name in self._bundle.tasks:
            self._store.add(name, partial(self._read_bundle_task, name))
        current = current if current is not None else (self._bundle.tasks[0] if self._bundle.tasks else None)
        if current is not None:
            self.switch(current)

    def _read_bundle_task(self, name: str) -> CompactTask:
        bundle, manifest = self._bundle, self._bundle.manifest
        try:
            return read_compact(bundle.task_path(name), manifest.fingerprint, self._shapes, manifest.embed_dim,
                                bundle.record(bundle.task_relative(name)), name, manifest.quick_gelu)
        except ArtifactError as exc:
            raise self._changed_since_load(name, exc) from None

    def _bundle_now(self) -> Bundle | None:
        """The bundle as it is on disk now (None if its manifest cannot be read)."""
        try:
            return Bundle.open(self._bundle.root)
        except RmtError:
            return None

    def _changed_since_load(self, name: str, error: ArtifactError) -> RmtError:
        """`error` (a task file failed its check), or what explains it: the bundle changed after load."""
        root, now = self._bundle.root, self._bundle_now()
        reload = f"load the bundle again (Engine.load({str(root)!r}), or restart the server) to serve it as it is now"
        if now is not None and name not in now.tasks:
            return UnknownTaskError(f"task {name!r} was removed from bundle {root} after this engine loaded it; "
                                    f"{reload} (tasks now: {', '.join(now.tasks[:20]) or 'none'})")
        relative = self._bundle.task_relative(name)
        if now is not None and (now.manifest.checksums.get(relative) != self._bundle.manifest.checksums.get(relative)
                                or now.manifest.fingerprint != self._bundle.manifest.fingerprint):
            return ArtifactError(f"{root / relative}: changed after this engine loaded bundle {root} (the bundle "
                                 f"was edited or replaced); {reload}")
        return error

    def _decode(self, task: CompactTask) -> Mapping[str, ZeroSet]:
        """Zero indices of each masked tensor in the backend's stored layout with the base values there,
        decoded as the pool rewrites each tensor (on its worker threads)."""
        specs = self._backend.specs
        decoders = {s.key: partial(_stored_zeros, self._pool, s, self._shapes[s.tensor]) for s in specs}
        return LazyZeros(task.blobs, decoders, {s.key: s.tensor for s in specs},
                         {s.key: ZeroSet.bytes_per_zero(s.dtype) for s in specs})

    def add_task(self, source: str | os.PathLike | TaskPack) -> str:
        """Hot-add a task from a .rmtask path or a TaskPack (verified and fingerprint-checked now);
        returns its name. It is switched to like any other task."""
        self._check_open()
        manifest = self._bundle.manifest
        task = read_compact(source, manifest.fingerprint, self._shapes, manifest.embed_dim,
                            quick_gelu=manifest.quick_gelu)
        with self._membership:
            self._store.add(task.head.name, lambda: task, task)
        return task.head.name

    def remove_task(self, task: str) -> None:
        """Hot-remove a task: new requests for it fail at once, runs using it finish first, then its
        buffer goes back to the pool and its memory is freed."""
        self._check_open()
        with self._membership:
            self._store.remove(task)
            with self._lock:
                if self._task == task:
                    self._task = None
                self._maths.pop(task, None)
            while self._pool.evict(task):
                pass

    def _head(self, task: str | None) -> TaskHead:
        name = self._task if task is None else task
        if name is None:
            raise InputError("no task selected: pass task=... or call engine.switch(task) first "
                             f"(available: {', '.join(self.tasks[:20]) or 'none'})")
        if name not in self._store and name not in self._bundle.tasks:
            now = self._bundle_now()
            if now is not None and name in now.tasks:
                raise UnknownTaskError(
                    f"task {name!r} was added to bundle {self._bundle.root} after this engine loaded it; load the "
                    f"bundle again (Engine.load, or restart the server), or add it to this engine with "
                    f"engine.add_task({str(now.task_path(name))!r})")
        return self._store.head(name)

    def _head_math(self, head: TaskHead) -> HeadMath:
        """The prepared logits math of a head; a cache head's is kept for the `cache_tasks` most
        recently used tasks (its float32 keys are twice the stored ones), rebuilt after that."""
        if head.cache is None:
            return head.prepared()
        with self._lock:
            held = self._maths.get(head.name)
            if held is not None and held[0] is head:
                self._maths.move_to_end(head.name)
                return held[1]
        math = head.prepared()
        with self._lock:
            self._maths[head.name] = (head, math)
            self._maths.move_to_end(head.name)
            while len(self._maths) > self._pool.capacity:
                self._maths.popitem(last=False)
        return math

    def _lease(self, task: str) -> Lease:
        return self._pool.acquire(task, partial(self._store.zeros, task))

    def switch(self, task: str) -> None:
        """Make `task` current and its weights resident (a rebind if cached, an in-place rewrite if not)."""
        self._check_open()
        self._head(task)
        lease = self._lease(task)
        try:
            if self._backend.concurrent:  # device copy or refit now, not on the next predict
                self._backend.prepare(lease)
            else:
                with self._run_lock:
                    self._backend.prepare(lease)
        finally:
            self._pool.release(lease)
        self._task = task

    # ------------------------------------------------------------ inference

    def predict(self, images: Any, task: str | None = None) -> Prediction:
        """Classify images with one task (default: the current one), atomically.

        `images`: paths, encoded bytes, PIL images, uint8 HWC arrays (one or a list), or a float32 NCHW
        batch already preprocessed. Batches larger than the bundle's max batch are split.
        """
        self._check_open()
        head = self._head(task)
        batch = to_batch(images, self._transform)
        embeddings = self._embed(batch, head.name)
        logits = self._head_math(head).logits(embeddings)
        _check_finite(logits, embeddings, head.name, isinstance(images, np.ndarray) and images.dtype != np.uint8)
        probs = _softmax(logits.copy())
        indices = logits.argmax(axis=1)
        labels = [head.class_names[i] for i in indices]
        return Prediction(head.name, logits, probs, indices, labels, head.class_names, embeddings)

    def embed(self, batch: np.ndarray, task: str) -> np.ndarray:
        """L2-normalised image embeddings of a preprocessed batch under one task's weights
        (or the unmasked base weights when task is `Engine.BASE`)."""
        self._check_open()
        if task != BASE:
            self._head(task)
        return self._embed(batch, task)

    def _embed(self, batch: np.ndarray, task: str) -> np.ndarray:
        lease = self._lease(task)
        try:
            if batch.shape[0] <= self._max_batch:
                return self._run(batch, lease)
            return np.concatenate([self._run(batch[start:start + self._max_batch], lease)
                                   for start in range(0, batch.shape[0], self._max_batch)])
        finally:
            self._pool.release(lease)

    def _run(self, batch: np.ndarray, lease: Lease) -> np.ndarray:
        if self._backend.concurrent:
            return self._backend.run(batch, lease)
        with self._run_lock:
            return self._backend.run(batch, lease)

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
        state = "closed" if self._closed else f"task={self._task!r}, tasks={len(self._store)}"
        return f"Engine({self._bundle.root}, backend={self.backend!r}, {state})"


def _check_finite(logits: np.ndarray, embeddings: np.ndarray, task: str, preprocessed: bool) -> None:
    """A NaN or Inf answer is never returned: InputError for a caller's preprocessed batch, else ArtifactError."""
    if np.isfinite(np.add.reduce(logits, axis=None)):
        return  # one reduction: a NaN or Inf in the logits, or in an embedding (every logit reads all of it),
        # makes the sum non-finite; the usual case costs 1 us
    bad = ~(np.isfinite(logits).all(axis=1) & np.isfinite(embeddings).all(axis=1))
    if not bad.any():
        return  # every value finite, only their sum overflowed
    rows = ", ".join(str(i) for i in np.flatnonzero(bad)[:8])
    if preprocessed:
        raise InputError(f"task {task!r}: the preprocessed batch gives non-finite logits for image(s) {rows}: "
                         "check its values (pass uint8 images to have them preprocessed)")
    raise ArtifactError(f"task {task!r}: non-finite logits for image(s) {rows}: the task or base weights are "
                        f"damaged, or the backend overflows; {REBUILD}")
