"""Plain ONNX Runtime sessions on a bundle's folded models: the baselines the shared engine is held to."""
from __future__ import annotations

from typing import Any

from rmt_deploy.artifacts.bundle import FOLDED_TASK_KEY, Bundle
from rmt_deploy.artifacts.integrity import REBUILD, BackgroundHash
from rmt_deploy.errors import ArtifactError, require


def folded_session(bundle: Bundle, task: str, threads: int | None = None) -> Any:
    """A new InferenceSession on a task's folded ONNX model (what a naive task switch costs)."""
    ort = require("onnxruntime", "onnx")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    relative = bundle.folded_relative(task)
    path = bundle.file(relative)  # confined once, used for the hash, the session and the messages
    digest = BackgroundHash(path, bundle.record(relative))
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's own exception types: name the damaged file, or the file ORT refused
        digest.check()
        raise ArtifactError(f"{path}: ONNX Runtime cannot load it "
                            f"({str(exc).strip()[:200] or type(exc).__name__}); {REBUILD}") from None
    digest.check()
    built_for = session.get_modelmeta().custom_metadata_map.get(FOLDED_TASK_KEY)
    if built_for != task:
        raise ArtifactError(f"{path}: this folded model was built for task {built_for!r}, the "
                            f"manifest lists it for {task!r}; {REBUILD}")
    return session
