"""tritonclient helpers for the serving tests: build a request, read an answer, the expected answer."""
from __future__ import annotations

import io
from typing import Any

import numpy as np

OUTPUTS = ("labels", "probs", "index", "embedding")
TASKS = {"alpha": (1, 3), "beta": (2, 4), "gamma": (3, 7), "delta": (4, 9)}  # name -> (seed, classes)
TOP_K = 5
MAX_PIXELS = 20_000  # the test server's image bound


def free_ports(n: int) -> list[int]:
    """n distinct ports that were free on 127.0.0.1 a moment ago."""
    import socket

    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def client_module(kind: str):
    if kind == "http":
        import tritonclient.http as module
    else:
        import tritonclient.grpc as module
    return module


def make_client(kind: str, served) -> Any:
    module = client_module(kind)
    return module.InferenceServerClient(served.http_url if kind == "http" else served.grpc_url)


def tensor(module, name: str, array: np.ndarray, datatype: str | None = None):
    datatype = datatype or ("BYTES" if array.dtype == object else {"uint8": "UINT8", "float32": "FP32"}[array.dtype.name])
    inp = module.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array)
    return inp


def request(module, task: str | None = None, image: np.ndarray | None = None, image_bytes: bytes | None = None):
    """Inputs of one request with one sample (batch dimension 1)."""
    inputs = []
    if task is not None:
        inputs.append(tensor(module, "task", np.array([[task.encode()]], dtype=object)))
    if image is not None:
        inputs.append(tensor(module, "image", image[None]))
    if image_bytes is not None:
        inputs.append(tensor(module, "image_bytes", np.array([[image_bytes]], dtype=object)))
    return inputs


def infer(kind: str, client, inputs, outputs=OUTPUTS, model: str = "rmt") -> dict[str, np.ndarray]:
    module = client_module(kind)
    requested = [module.InferRequestedOutput(name) for name in outputs]
    result = client.infer(model, inputs, outputs=requested)
    return {name: result.as_numpy(name) for name in outputs}


def expected(engine, task: str, image: Any, k: int) -> dict[str, np.ndarray]:
    """What the server must answer, from the in-process Engine (Prediction.top_k, embed)."""
    from rmt_deploy.runtime.preprocess import ImageTransform, to_batch

    prediction = engine.predict([image], task=task)
    pairs = prediction.top_k(k)[0]
    labels = [name.encode() for name, _ in pairs] + [b""] * (k - len(pairs))
    probs = [p for _, p in pairs] + [0.0] * (k - len(pairs))
    batch = to_batch([image], ImageTransform.from_config(engine.bundle.manifest.preprocess))
    return {"labels": np.array([labels], dtype=object), "probs": np.array([probs], np.float32),
            "index": np.array([[prediction.indices[0]]], np.int64), "embedding": engine.embed(batch, task)}


# Batched requests: ONNX Runtime's kernels round differently at other batch sizes; in-process
# Engine.predict of 16 images vs one at a time differs by up to 1.8e-6 in probabilities here
# (logit scale 100 amplifies ~1e-7 in the embedding), so answers computed beside batch-mates are
# held to labels and index exactly and probabilities within 1e-5; a request alone, to 1e-6.
BATCHED_PROBS_TOL = 1e-5


def mismatch(got: dict[str, np.ndarray], want: dict[str, np.ndarray], probs_tol: float = 1e-6) -> str | None:
    """None when a served answer equals the expected one (labels, index exactly), else what differs."""
    for name in got:
        if name in ("labels", "index"):
            if got[name].shape != want[name].shape or not (got[name] == want[name]).all():
                return f"{name}: {got[name]} != {want[name]}"
        else:
            tol = probs_tol if name == "probs" else 1e-5
            if got[name].shape != want[name].shape or np.abs(got[name] - want[name]).max() > tol:
                return f"{name}: max difference {np.abs(got[name] - want[name]).max()}"
    return None


def encode(image: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()
