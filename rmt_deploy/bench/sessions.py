"""Plain ONNX Runtime sessions on a bundle's folded models: the baselines the shared engine is held to."""
from __future__ import annotations

from typing import Any

from rmt_deploy.bundle import Bundle
from rmt_deploy.errors import require


def folded_session(bundle: Bundle, task: str, threads: int | None = None) -> Any:
    """A new InferenceSession on a task's folded ONNX model (what a naive task switch costs)."""
    ort = require("onnxruntime", "onnx")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(bundle.folded_path(task)), options, providers=["CPUExecutionProvider"])
