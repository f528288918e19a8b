"""TaskReplica: one Ray Serve replica = one Engine; the task is the multiplexed model id.

Ray Serve routes a request whose multiplexed model id is a task to a replica that holds
that task. Here "loading a model" is making the task resident in the Engine's pool (a
mask rewrite of one buffer, not a model load), and Serve's per-replica LRU
(max_num_models_per_replica) is set to the pool's size (cache_tasks), so the tasks Serve
believes resident are the ones the pool holds. Every reply names its task, replica and
process, so the ingress can check it and the tests can count what was resident.
Plain class: rmt_deploy.serving.ray wraps it with serve.deployment. No torch import.
"""
from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from typing import Any

import numpy as np

from rmt_deploy.errors import InternalError, RmtError
from rmt_deploy.serving import protocol
from rmt_deploy.serving.ray_config import RayServeConfig

__all__ = ["TaskReplica"]


class TaskReplica:
    """Hosts one Engine over the bundle; `infer(task, images)` answers with that task's outputs."""

    def __init__(self, config: dict[str, Any]):
        import ray
        from ray import serve

        from rmt_deploy.runtime.engine import Engine

        self._config = cfg = RayServeConfig.from_dict(config)
        self._engine = Engine.load(cfg.bundle, backend=cfg.backend, device=cfg.device,
                                   cache_tasks=cfg.cache_tasks, threads=cfg.threads)
        self._multiplexed = cfg.routing == "multiplexed"
        context = serve.get_replica_context()
        self._replica = context.replica_id.unique_id
        self._pid = os.getpid()
        self._node = ray.get_runtime_context().get_node_id()
        self._lock = threading.Lock()
        self._counts = {"requests": 0, "samples": 0, "resident_hits": 0, "loads": 0, "errors": 0, "ongoing": 0}
        self._served = protocol.ServedTasks(self._engine.tasks, self._engine.bundle.root)
        self._max_resident = len(self._engine.resident_tasks)
        self._started = time.time()
        # the loader as a plain closure (Serve keeps its LRU on the function), so
        # max_num_models_per_replica can follow the config
        async def load(task: str) -> str:
            return await self._load(task)

        self._loader = load
        self._make_resident = serve.multiplexed(max_num_models_per_replica=cfg.cache_tasks)(load)

    async def _load(self, task: str) -> str:
        """Serve's "model load" for a task: rewrite a pool buffer to hold it (the pool evicts its LRU)."""
        self._count("loads")
        await asyncio.to_thread(self._engine.switch, task)
        return task

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    async def infer(self, task: str, images: list[np.ndarray], embedding: bool) -> dict[str, Any]:
        """One task's images -> {"task", "outputs" | "error", "replica", "pid", "resident_hit", "resident"}."""
        from ray import serve

        hit = task in self._engine.resident_tasks
        self._count("ongoing")
        try:
            if self._multiplexed:
                model_id = serve.get_multiplexed_model_id()
                if model_id != task:
                    raise InternalError(f"request for task {task!r} arrived with multiplexed model id "
                                        f"{model_id!r}")
                await self._make_resident(task)
            outputs = await asyncio.to_thread(self._predict, task, images, embedding)
            reply: dict[str, Any] = {"outputs": outputs}
        except RmtError as exc:
            self._count("errors")
            reply = {"error": str(self._served.explain(task, exc))}  # removed from the bundle since load?
        finally:
            self._count("ongoing", -1)
        resident = self._engine.resident_tasks
        with self._lock:
            self._counts["requests"] += 1
            self._counts["samples"] += len(images)
            self._counts["resident_hits"] += int(hit)
            self._max_resident = max(self._max_resident, len(resident))
        reply.update(task=task, replica=self._replica, pid=self._pid, resident_hit=hit, resident=resident)
        return reply

    def _predict(self, task: str, images: list[np.ndarray], embedding: bool) -> dict[str, np.ndarray]:
        """As the Triton model does: one engine run, its embeddings kept (sent only when asked for)."""
        prediction = self._engine.predict(images, task=task)
        if prediction.task != task:
            raise InternalError(f"engine answered task {prediction.task!r} for {task!r}")
        return protocol.encode_outputs(prediction, self._config.top_k, prediction.embeddings if embedding else None)

    def describe(self) -> dict[str, Any]:
        """What the ingress needs for metadata: tasks, embedding size, top-k."""
        return {"tasks": self._engine.tasks, "embed_dim": int(self._engine.bundle.manifest.embed_dim),
                "top_k": self._config.top_k, "backend": self._engine.backend}

    def _multiplexed_ids(self) -> list[str] | None:
        """The task ids Serve's multiplexer holds here (its wrapper lives on the loader; private to Ray)."""
        wrapper = getattr(self._loader, "__serve_multiplex_wrapper", None)
        return None if wrapper is None else list(getattr(wrapper, "models", {}))

    def stats(self) -> dict[str, Any]:
        """This replica: id, pid, resident tasks now and the most ever, counters, the pool's stats."""
        with self._lock:
            counts = dict(self._counts)
            most = self._max_resident
        return {"replica": self._replica, "pid": self._pid, "node": self._node, "resident": self._engine.resident_tasks,
                "multiplexed": self._multiplexed_ids(),
                "max_resident": most, "cache_tasks": self._config.cache_tasks, "pool": self._engine.cache_stats,
                "uptime_s": round(time.time() - self._started, 3), "torch_loaded": "torch" in sys.modules,
                **counts}

    def check_health(self) -> None:
        """Ray Serve's health check: the engine must still be open."""
        if not self._engine.tasks:
            raise InternalError("replica engine holds no tasks")

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.close()
