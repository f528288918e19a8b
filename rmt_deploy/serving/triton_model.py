"""The Triton Python-backend model that hosts one Engine: `TritonPythonModel` for a model.py.

Triton's dynamic batcher hands `execute` a list of requests, possibly of different tasks and
image sizes (the `image` input allows ragged batches). Each request is decoded on its own
(serving.protocol); a bad one gets its own error response. The good samples are grouped by
task, each group runs once on its task's weights (engine.predict), and every request is
answered in order with its own rows, so a result never depends on its batch-mates. A request
for a task added to (or removed from) the bundle after load says so (protocol.ServedTasks).
Model parameters (config.pbtxt): bundle, top_k, cache_tasks, threads, backend, max_image_pixels.
Runs inside Triton's stub process: `triton_python_backend_utils` is importable only there.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from rmt_deploy.errors import RmtError
from rmt_deploy.serving import protocol

PARAMETERS = ("bundle", "top_k", "cache_tasks", "threads", "backend", "max_image_pixels")


def model_parameters(args: dict[str, Any]) -> dict[str, str]:
    """config.pbtxt `parameters` as name -> string value (Triton passes the config as JSON)."""
    config = json.loads(args["model_config"])
    return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}


def bundle_path(value: str, args: dict[str, Any]) -> Path:
    """The bundle parameter: absolute, or relative to the model's version folder (an exported repository)."""
    path = Path(value)
    if not path.is_absolute():
        path = Path(args["model_repository"]) / str(args["model_version"]) / path
    return path


class TritonPythonModel:
    """Python-backend model: one Engine over a bundle; requests carry image or image_bytes and task."""

    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        from rmt_deploy.runtime.engine import Engine
        from rmt_deploy.serving.metrics import ServingMetrics

        self._pb = pb_utils
        params = model_parameters(args)
        threads = int(params["threads"]) if params.get("threads") else None
        self.engine = Engine.load(bundle_path(params["bundle"], args), backend=params.get("backend") or "auto",
                                  cache_tasks=int(params.get("cache_tasks") or 2), threads=threads)
        self.top_k = int(params.get("top_k") or 5)
        self.tasks = protocol.ServedTasks(self.engine.tasks, self.engine.bundle.root)
        pixels = params.get("max_image_pixels")
        self.limits = protocol.ImageLimits(max_pixels=int(pixels)) if pixels else protocol.ImageLimits()
        self.metrics = ServingMetrics(pb_utils, args["model_name"])

    def execute(self, requests: list[Any]) -> list[Any]:
        samples: list[list[protocol.Sample] | None] = []
        errors: dict[int, str] = {}
        for i, request in enumerate(requests):
            try:
                samples.append(protocol.decode_inputs(self._inputs(request), self.tasks, self.limits))
            except Exception as exc:  # noqa: BLE001 - a request that cannot be read fails alone
                samples.append(None)
                errors[i] = str(exc) if isinstance(exc, RmtError) else f"internal error: {type(exc).__name__}: {exc}"
        results = self._run(samples, errors)
        self.metrics.record(samples, len(errors), self.engine.cache_stats)
        return [self._response(results.get(i), errors.get(i)) for i in range(len(requests))]

    def _inputs(self, request: Any) -> dict[str, np.ndarray | None]:
        inputs = {}
        for name in protocol.INPUTS:
            tensor = self._pb.get_input_tensor_by_name(request, name)
            inputs[name] = None if tensor is None else tensor.as_numpy()
        return inputs

    def _run(self, samples: list[list[protocol.Sample] | None],
             errors: dict[int, str]) -> dict[int, dict[str, np.ndarray]]:
        """Each task's samples in one engine run; request i -> its outputs, rows in the request's order
        (a group that fails is rerun request by request, so only the failing request gets an error)."""
        flat = [(i, k, s) for i, request in enumerate(samples) if request for k, s in enumerate(request)]
        rows: dict[int, list[Any]] = {i: [None] * len(request) for i, request in enumerate(samples) if request}
        for task, positions in protocol.group_by_task([s for _, _, s in flat]).items():
            owners = [flat[p][:2] for p in positions]
            try:
                outputs = self._predict(task, [flat[p][2].image for p in positions])
            except Exception:  # noqa: BLE001 - must not fail the batch: rerun per request below
                for i in sorted({i for i, _ in owners}):
                    self._run_alone(i, samples[i], errors, rows)
                continue
            for row, (i, k) in enumerate(owners):
                rows[i][k] = {name: value[row] for name, value in outputs.items()}
        return {i: {name: np.stack([r[name] for r in parts]) for name in parts[0]}
                for i, parts in rows.items() if i not in errors}

    def _run_alone(self, i: int, request: list[protocol.Sample], errors: dict[int, str],
                   rows: dict[int, list[Any]]) -> None:
        task = ""
        try:
            for task, positions in protocol.group_by_task(request).items():
                outputs = self._predict(task, [request[p].image for p in positions])
                for row, k in enumerate(positions):
                    rows[i][k] = {name: value[row] for name, value in outputs.items()}
        except RmtError as exc:
            errors[i] = str(self.tasks.explain(task, exc))  # a task removed from the bundle since load says so
        except Exception as exc:  # noqa: BLE001 - one request's failure is its own, never the batch's
            errors[i] = f"internal error: {type(exc).__name__}: {exc}"

    def _predict(self, task: str, images: list[Any]) -> dict[str, np.ndarray]:
        """One engine run for one task's images: all four outputs (Triton returns the requested ones)."""
        prediction = self.engine.predict(images, task=task)
        return protocol.encode_outputs(prediction, self.top_k, prediction.embeddings)

    def _response(self, outputs: dict[str, np.ndarray] | None, error: str | None) -> Any:
        pb = self._pb
        if error is not None or outputs is None:
            error = pb.TritonError(error or "internal error", pb.TritonError.INVALID_ARG)
            return pb.InferenceResponse(output_tensors=[], error=error)
        return pb.InferenceResponse(output_tensors=[pb.Tensor(name, value) for name, value in outputs.items()])

    def finalize(self) -> None:
        self.engine.close()
