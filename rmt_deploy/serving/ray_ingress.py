"""KServeIngress: the Ray Serve HTTP ingress that speaks KServe v2, as `rmt-deploy serve` does.

    GET  /v2/health/live | /v2/health/ready          200 when live / when a replica answers
    GET  /v2  |  /v2/models/<model>  |  .../ready    server and model metadata
    POST /v2/models/<model>/infer                    inputs task + image | image_bytes (JSON or
                                                     Triton's binary tensor extension)
    GET  /v2/models/<model>/stats                    rmt-deploy extension: per-replica residency

A request is validated here (serving.protocol, before any replica is bothered), split by
task, and each task's images go to a replica with the task as the multiplexed model id.
A replica that dies under a request is retried once on another; if that fails too the
client gets 503. A reply is checked to be for the task asked before it is used.
Plain class: rmt_deploy.serving.ray wraps it with serve.deployment. No torch import.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import threading
from typing import Any

import numpy as np

from rmt_deploy import __version__
from rmt_deploy.errors import InternalError, RmtError
from rmt_deploy.serving import protocol
from rmt_deploy.serving.kserve_http import (
    HEADER_LENGTH,
    InferRequest,
    encode_infer_response,
    error_body,
    parse_infer_request,
)
from rmt_deploy.serving.ray_config import RayServeConfig

__all__ = ["KServeIngress", "ReplicaUnavailable"]

ATTEMPTS = 2  # a request on a replica that died is retried once


class ReplicaUnavailable(RmtError):
    """No replica could answer (one died under the request and the retry failed too)."""


class KServeIngress:
    """HTTP front door: KServe v2 over one deployment of TaskReplicas (or several, round-robin)."""

    def __init__(self, replicas: Any, config: dict[str, Any]):
        from rmt_deploy.artifacts.bundle import Bundle

        self._config = cfg = RayServeConfig.from_dict(config)
        self._handles = list(replicas) if isinstance(replicas, (list, tuple)) else [replicas]
        bundle = Bundle.open(cfg.bundle)  # the manifest only: task names and sizes for validation
        self._tasks = protocol.ServedTasks(bundle.tasks, bundle.root)
        self._embed_dim = int(bundle.manifest.embed_dim)
        self._limits = protocol.ImageLimits(max_pixels=cfg.max_image_pixels)
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._counts = {"requests": 0, "ok": 0, "bad_requests": 0, "unavailable": 0, "internal_errors": 0,
                        "replica_failures": 0, "retries": 0}

    # ------------------------------------------------------------ HTTP

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import Response

        method, parts = request.method, [p for p in request.url.path.split("/") if p]
        status, body, headers = await self._route(method, parts, request)
        headers = dict(headers or {})
        media = headers.pop("content-type", "application/json")
        return Response(body, status_code=status, media_type=media, headers=headers)

    async def _route(self, method: str, parts: list[str], request: Any) -> tuple[int, bytes, dict | None]:
        name = self._config.model_name
        if parts[:1] != ["v2"]:
            return 404, error_body(f"no route {'/'.join(parts)!r}: this server speaks KServe v2 under /v2"), None
        if parts == ["v2", "health", "live"]:
            return 200, b"", None
        if parts == ["v2", "health", "ready"] or parts == ["v2", "models", name, "ready"]:
            ready = await self._ready()
            return (200, b"", None) if ready else (503, error_body("no replica is ready yet"), None)
        if parts == ["v2"]:
            return 200, _json({"name": "rmt-deploy-ray", "version": __version__,
                               "extensions": ["binary_tensor_data"]}), None
        if len(parts) >= 3 and parts[1] == "models" and parts[2] != name:
            return 400, error_body(f"model {parts[2]!r} is not served here (available: {name})"), None
        if parts == ["v2", "models", name] and method == "GET":
            return 200, _json(self._metadata()), None
        if parts == ["v2", "models", name, "stats"] and method == "GET":
            return 200, _json(await self.stats()), None
        if parts == ["v2", "models", name, "infer"]:
            if method != "POST":
                return 405, error_body("infer takes POST"), None
            return await self._infer_http(request)
        return 404, error_body(f"no route {'/' + '/'.join(parts)!r} (KServe v2: /v2/models/{name}/infer)"), None

    async def _infer_http(self, request: Any) -> tuple[int, bytes, dict | None]:
        self._count("requests")
        try:
            body = await self._read_body(request)
            parsed, samples = await asyncio.to_thread(self._decode, body, request.headers.get(HEADER_LENGTH))
            outputs = await self.infer(samples, parsed.outputs is None or protocol.EMBEDDING in parsed.outputs)
            payload, headers = encode_infer_response(self._config.model_name, outputs, parsed)
        except ReplicaUnavailable as exc:
            self._count("unavailable")
            return 503, error_body(str(exc)), None
        except RmtError as exc:
            self._count("bad_requests")
            return 400, error_body(str(exc)), None
        except Exception as exc:  # noqa: BLE001 - a bug answers 500 with its name, the server keeps serving
            self._count("internal_errors")
            return 500, error_body(_internal(exc)), None
        self._count("ok")
        return 200, payload, headers

    async def _read_body(self, request: Any) -> bytes:
        """The request body, refused as soon as it passes max_request_bytes (declared or streamed)."""
        limit = self._config.max_request_bytes
        declared = request.headers.get("content-length")
        too_big = f"request body is larger than the server's limit of {limit:,} bytes: send smaller or fewer images"
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise protocol.RequestError(too_big)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise protocol.RequestError(too_big)
            chunks.append(chunk)
        return b"".join(chunks)

    def _decode(self, body: bytes, header_length: str | None) -> tuple[InferRequest, list[protocol.Sample]]:
        parsed = parse_infer_request(body, header_length, self._limits)
        unknown = sorted(set(parsed.outputs or ()) - set(protocol.OUTPUTS))
        if unknown:  # refused before any replica works on it
            raise protocol.RequestError(f"output {unknown[0]!r} is not one of {', '.join(protocol.OUTPUTS)}")
        return parsed, protocol.decode_inputs(parsed.inputs, self._tasks, self._limits)

    # ------------------------------------------------------------ inference

    async def infer(self, samples: list[protocol.Sample], embedding: bool = True) -> dict[str, np.ndarray]:
        """Samples of any tasks -> output tensors in sample order; each task's group on one replica."""
        groups = protocol.group_by_task(samples)
        replies = await asyncio.gather(*(
            self._call(task, [np.asarray(samples[p].image) for p in positions], embedding)
            for task, positions in groups.items()))
        rows: list[dict[str, np.ndarray] | None] = [None] * len(samples)
        for positions, reply in zip(groups.values(), replies):
            for row, position in enumerate(positions):
                rows[position] = {name: value[row] for name, value in reply["outputs"].items()}
        return {name: np.stack([row[name] for row in rows]) for name in rows[0]}

    async def _call(self, task: str, images: list[np.ndarray], embedding: bool) -> dict[str, Any]:
        from ray.exceptions import ActorUnavailableError, RayActorError

        last: Exception | None = None
        for attempt in range(ATTEMPTS):
            try:
                reply = await self._handle(task).infer.remote(task, images, embedding)
            except (RayActorError, ActorUnavailableError) as exc:
                self._count("replica_failures")
                last = exc
                if attempt + 1 < ATTEMPTS:
                    self._count("retries")
                continue
            if reply.get("task") != task:
                raise InternalError(f"a replica answered task {reply.get('task')!r} for a request of {task!r}")
            if "error" in reply:
                raise protocol.RequestError(reply["error"])
            return reply
        raise ReplicaUnavailable(f"task {task!r}: the replica died under the request and the retry failed "
                                 f"({type(last).__name__}); Ray is replacing it, try again shortly")

    def _handle(self, task: str) -> Any:
        routing = self._config.routing
        if routing == "multiplexed":
            return self._handles[0].options(multiplexed_model_id=task)
        return self._handles[next(self._turn) % len(self._handles)]  # round-robin

    async def _ready(self) -> bool:
        try:
            await asyncio.wait_for(self._handles[0].describe.remote(), timeout=10)
            return True
        except Exception:  # noqa: BLE001 - not ready, whatever the reason
            return False

    # ------------------------------------------------------------ metadata, stats

    def _metadata(self) -> dict[str, Any]:
        k, name = self._config.top_k, self._config.model_name
        tensor = lambda n, t, s: {"name": n, "datatype": t, "shape": s}  # noqa: E731
        return {"name": name, "versions": ["1"], "platform": "rmt-deploy-ray",
                "inputs": [tensor(protocol.TASK, "BYTES", [-1, 1]),
                           tensor(protocol.IMAGE, "UINT8", [-1, -1, -1, 3]),
                           tensor(protocol.IMAGE_BYTES, "BYTES", [-1, 1])],
                "outputs": [tensor(protocol.LABELS, "BYTES", [-1, k]), tensor(protocol.PROBS, "FP32", [-1, k]),
                            tensor(protocol.INDEX, "INT64", [-1, 1]),
                            tensor(protocol.EMBEDDING, "FP32", [-1, self._embed_dim])],
                "parameters": {"tasks": sorted(self._tasks), "routing": self._config.routing}}

    async def stats(self) -> dict[str, Any]:
        """The ingress's counters and every live replica's stats (Serve broadcast)."""
        replicas: list[Any] = []
        for handle in self._handles:
            replicas += await handle.broadcast("stats").results_async(timeout_s=10, return_exceptions=True)
        with self._lock:
            counts = dict(self._counts)
        return {"ingress": counts, "replicas": [r for r in replicas if isinstance(r, dict)],
                "unreachable_replicas": sum(not isinstance(r, dict) for r in replicas)}

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1


def _internal(exc: BaseException) -> str:
    """A one-line message for a bug (a replica's exception arrives wrapped with its traceback)."""
    cause = getattr(exc, "cause", None) or exc
    first = (str(cause).strip().splitlines() or [""])[0]
    return f"internal error: {type(cause).__name__}: {first[:300]}"


def _json(data: Any) -> bytes:
    return json.dumps(data).encode()
