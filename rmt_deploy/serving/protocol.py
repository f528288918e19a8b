"""The request/response mapping every rmt-deploy server shares (Triton, Ray Serve): no server imports.

One request carries N >= 1 samples along its first (batch) dimension, as KServe v2 /
Triton tensors with a batch dimension do:

    inputs   task         BYTES [N, 1]        the task name (UTF-8)
             image        UINT8 [N, H, W, 3]  RGB pixels, any H, W within ImageLimits
          or image_bytes  BYTES [N, 1]        an encoded JPEG / PNG / WebP / BMP file
    outputs  labels       BYTES [N, k]        top-k class names, "" past a task's class count
             probs        FP32  [N, k]        their probabilities, 0 past a task's class count
             index        INT64 [N, 1]        the top class (argmax of the logits)
             embedding    FP32  [N, D]        the L2-normalised image embedding under the task

`decode_inputs` validates one request before anything is allocated for it and raises an
RmtError naming the problem (RequestError, or UnknownTaskError listing the tasks; with
ServedTasks, one saying so when the task was added to the bundle after the server loaded it);
`group_by_task` splits a batch of samples by task, keeping order; `encode_outputs` turns
an Engine Prediction into the outputs above. `inputs_from_json` / `response_to_json`
read and write the KServe v2 JSON body for HTTP ingresses that are not Triton.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from rmt_deploy.errors import InputError, RmtError, UnknownTaskError
from rmt_deploy.runtime import image_decode

__all__ = [
    "TASK", "IMAGE", "IMAGE_BYTES", "LABELS", "PROBS", "INDEX", "EMBEDDING", "INPUTS", "OUTPUTS",
    "RequestError", "ImageLimits", "Sample", "ServedTasks", "decode_inputs", "group_by_task", "encode_outputs",
    "tensor_from_json", "tensor_to_json", "inputs_from_json", "response_to_json",
]

TASK, IMAGE, IMAGE_BYTES = "task", "image", "image_bytes"
LABELS, PROBS, INDEX, EMBEDDING = "labels", "probs", "index", "embedding"
INPUTS = (TASK, IMAGE, IMAGE_BYTES)
OUTPUTS = (LABELS, PROBS, INDEX, EMBEDDING)
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")

# KServe v2 datatype <-> numpy dtype, for the tensors rmt-deploy reads and writes
DATATYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "INT32": np.int32, "INT64": np.int64,
             "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_}


class RequestError(InputError):
    """A request a server refuses: a missing, malformed or out-of-bounds input (named in the message)."""


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on what one request may make a server allocate or decode."""

    max_pixels: int = 4096 * 4096          # per image, raw or decoded (no decompression bombs)
    max_side: int = 16384
    max_encoded_bytes: int = 32 << 20      # per image_bytes element
    max_samples: int = 64                  # along one request's batch dimension
    max_request_pixels: int = 64 << 20     # decoded image_bytes held at once by one request (4 B/px: 256 MiB)
    max_json_elements: int = 64 << 20      # per KServe v2 JSON tensor


@dataclass(frozen=True)
class Sample:
    """One image to classify and the task to classify it with; image is uint8 HxWx3 or a decoded PIL image."""

    task: str
    image: np.ndarray | Image.Image


class ServedTasks(Collection[str]):
    """The tasks a server loaded from its bundle (a set of names), and what explains a request for
    another one: the bundle on disk now, consulted on the failure paths only (a request for a task
    not served, a served task whose file is gone), never on the way of a good request.

    The bundle's manifest is re-read only when its file changed (size, inode, times), so a client
    that keeps naming unknown tasks costs a stat per request."""

    def __init__(self, names: Collection[str], bundle_root: str | os.PathLike):
        self._names = frozenset(names)
        self.root = Path(bundle_root)
        self._seen: tuple[tuple[int, ...], list[str] | None] | None = None  # (manifest stat, tasks on disk)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def on_disk(self) -> list[str] | None:
        """The bundle's tasks as its manifest lists them now (None if it cannot be read)."""
        from rmt_deploy.artifacts.bundle import MANIFEST, Bundle

        try:
            info = os.stat(self.root / MANIFEST)
        except OSError:
            return None
        signature = (info.st_ino, info.st_dev, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        seen = self._seen
        if seen is not None and seen[0] == signature:
            return seen[1]
        try:
            tasks: list[str] | None = Bundle.open(self.root).tasks
        except (RmtError, OSError):
            tasks = None
        self._seen = (signature, tasks)
        return tasks

    def unknown(self, name: str) -> UnknownTaskError:
        """The error for a request naming `name`, a task this server does not serve."""
        now = self.on_disk()
        if now is not None and name in now:
            return UnknownTaskError(f"task {name[:200]!r} not served: it was added to bundle {self.root} after "
                                    f"the server loaded it; restart the server to serve it "
                                    f"(served: {_names(self)})")
        return not_served(name, self)

    def explain(self, name: str, error: Exception) -> Exception:
        """`error` (a served task failed), or what explains it: the task was removed from the bundle
        after the server loaded it."""
        if name in self._names and isinstance(error, UnknownTaskError):
            now = self.on_disk()
            if now is not None and name not in now:
                return UnknownTaskError(f"task {name!r} was removed from bundle {self.root} after the server "
                                        f"loaded it; restart the server to serve the bundle as it is now "
                                        f"(tasks now: {', '.join(now[:20]) or 'none'})")
        return error


def not_served(name: str, tasks: Collection[str]) -> UnknownTaskError:
    """The error for a request naming a task outside `tasks`."""
    return UnknownTaskError(f"task {name[:200]!r} not served (available: {_names(tasks)})")


# ---------------------------------------------------------------- requests

def decode_inputs(inputs: Mapping[str, np.ndarray | None], tasks: Collection[str],
                  limits: ImageLimits = ImageLimits()) -> list[Sample]:
    """Validate and decode one request's input tensors (name -> array with a batch dimension).

    Raises RequestError for a missing, extra, mistyped, misshaped, empty, oversized or undecodable
    input, UnknownTaskError for a task the server does not hold (naming the ones it does; when
    `tasks` is a ServedTasks, saying so if the task was added to the bundle after the server loaded it)."""
    given = {name: array for name, array in inputs.items() if array is not None}
    extra = sorted(set(given) - set(INPUTS))
    if extra:
        raise RequestError(f"unexpected input {extra[0]!r}: send 'task' and one of 'image', 'image_bytes'")
    if TASK not in given:
        raise RequestError(f"missing input 'task' (BYTES [1]: the task name; available: {_names(tasks)})")
    names = _task_names(given[TASK], tasks, limits)
    if (IMAGE in given) == (IMAGE_BYTES in given):
        which = "both" if IMAGE in given else "neither"
        raise RequestError(f"{which} of 'image' and 'image_bytes' given: send exactly one "
                           "(image: UINT8 [H, W, 3]; image_bytes: BYTES [1], a JPEG or PNG file)")
    if IMAGE in given:
        images: Sequence[Any] = _raw_images(given[IMAGE], len(names), limits)
    else:
        images = _decode_all(_bytes_column(given[IMAGE_BYTES], IMAGE_BYTES, len(names), limits), limits)
    return [Sample(task, image) for task, image in zip(names, images)]


def _names(tasks: Collection[str]) -> str:
    return ", ".join(sorted(tasks)) or "none"


def _bytes_column(array: np.ndarray, name: str, count: int | None = None,
                  limits: ImageLimits = ImageLimits()) -> list[bytes]:
    """The elements of a BYTES [N, 1] (or [N]) tensor as bytes, N checked against count / limits."""
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "OSU":
        raise RequestError(f"input {name!r} has datatype {_datatype(array)}, expected BYTES")
    if not (array.ndim == 1 or (array.ndim == 2 and array.shape[1] == 1)):
        raise RequestError(f"input {name!r} has shape {list(array.shape)}, expected [1] per request "
                           f"([N, 1] with the batch dimension)")
    n = array.shape[0]
    if n == 0:
        raise RequestError(f"input {name!r} is empty: send one element per sample")
    if count is not None and n != count:
        raise RequestError(f"input {name!r} has {n} elements but 'task' has {count}: send one per sample")
    if n > limits.max_samples:
        raise RequestError(f"input {name!r} has {n} samples, more than {limits.max_samples} in one request")
    out = []
    for item in array.reshape(-1):
        if isinstance(item, str):
            item = item.encode("utf-8")
        if not isinstance(item, (bytes, np.bytes_)):
            raise RequestError(f"input {name!r} holds a {type(item).__name__}, expected bytes")
        out.append(bytes(item))
    return out


def _task_names(array: np.ndarray, tasks: Collection[str], limits: ImageLimits) -> list[str]:
    names = []
    for raw in _bytes_column(array, TASK, limits=limits):
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"task {raw[:64]!r} is not UTF-8 text (available: {_names(tasks)})") from None
        if name not in tasks:
            raise tasks.unknown(name) if isinstance(tasks, ServedTasks) else not_served(name, tasks)
        names.append(name)
    return names


def _datatype(array: Any) -> str:
    if not isinstance(array, np.ndarray):
        return type(array).__name__
    for name, dtype in DATATYPES.items():
        if array.dtype == dtype or (name == "BYTES" and array.dtype.kind in "OSU"):
            return name
    return str(array.dtype)


def _check_size(height: int, width: int, what: str, limits: ImageLimits, budget: int | None = None) -> None:
    if height < 1 or width < 1:
        raise RequestError(f"{what} is empty ({height}x{width} pixels)")
    if max(height, width) > limits.max_side or height * width > limits.max_pixels:
        raise RequestError(f"{what} is {height}x{width} pixels, more than the server's limit of "
                           f"{limits.max_pixels:,} pixels ({limits.max_side} per side): send a smaller image")
    if budget is not None and height * width > budget:
        raise RequestError(f"{what}: the request's images decode to more than the server's limit of "
                           f"{max(limits.max_request_pixels, limits.max_pixels):,} pixels per request: "
                           "send fewer or smaller images per request")


def _raw_images(array: Any, count: int, limits: ImageLimits) -> list[np.ndarray]:
    """A UINT8 [N, H, W, 3] tensor -> N HxWx3 arrays (views, no copy)."""
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8:
        raise RequestError(f"input 'image' has datatype {_datatype(array)}, expected UINT8 "
                           "(RGB pixels; send encoded files as 'image_bytes')")
    if array.ndim != 4 or array.shape[3] != 3:
        raise RequestError(f"input 'image' has shape {list(array.shape)}, expected [H, W, 3] per request "
                           "([N, H, W, 3] with the batch dimension)")
    if array.shape[0] != count:
        raise RequestError(f"input 'image' has {array.shape[0]} samples but 'task' has {count}: "
                           "send one task per image")
    _check_size(int(array.shape[1]), int(array.shape[2]), "input 'image'", limits)
    return list(array)


def _decode_all(files: list[bytes], limits: ImageLimits) -> list[Image.Image]:
    """Decode a request's files, refusing one whose header takes the request past max_request_pixels."""
    budget = max(limits.max_request_pixels, limits.max_pixels)
    images: list[Image.Image] = []
    for data in files:
        images.append(decode_image(data, limits, budget))
        budget -= images[-1].size[0] * images[-1].size[1]
    return images


def decode_image(data: bytes, limits: ImageLimits = ImageLimits(), budget: int | None = None) -> Image.Image:
    """An encoded JPEG / PNG / WebP / BMP file -> a loaded RGB PIL image, through the decoder every path
    shares (runtime.image_decode); its pixel count is checked from the header before any pixel is decoded."""
    if not data:
        raise RequestError("input 'image_bytes' is empty: send the encoded image file")
    if len(data) > limits.max_encoded_bytes:
        raise RequestError(f"input 'image_bytes' is {len(data):,} bytes, more than the server's limit of "
                           f"{limits.max_encoded_bytes:,}")
    return image_decode.decode_image(
        data, f"input 'image_bytes' ({len(data):,} bytes)",
        lambda width, height: _check_size(height, width, "input 'image_bytes'", limits, budget),
        formats=IMAGE_FORMATS, error=RequestError,
        on_bomb=lambda detail: RequestError(f"input 'image_bytes' declares more pixels than the server's limit of "
                                            f"{limits.max_pixels:,} ({detail}): send a smaller image"))


def group_by_task(samples: Sequence[Sample]) -> dict[str, list[int]]:
    """Task -> positions of its samples, tasks in order of first appearance, positions ascending."""
    groups: dict[str, list[int]] = {}
    for position, sample in enumerate(samples):
        groups.setdefault(sample.task, []).append(position)
    return groups


# ---------------------------------------------------------------- responses

def encode_outputs(prediction: Any, k: int, embeddings: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """An Engine Prediction (N images) -> output tensors with a batch dimension of N.

    Top-k follows Prediction.top_k (stable, most probable first); a task with fewer than k
    classes is padded with "" / 0.0. `embeddings` (FP32 [N, D]) adds the 'embedding' output."""
    if k < 1:
        raise InputError(f"top-k {k} must be at least 1")
    probs = np.asarray(prediction.probs, np.float32)
    n, classes = probs.shape
    order = np.argsort(-probs, axis=1, kind="stable")[:, :min(k, classes)]
    labels = np.full((n, k), b"", dtype=object)
    top = np.zeros((n, k), np.float32)
    names = [name.encode("utf-8") for name in prediction.class_names]
    for row in range(n):
        for col, j in enumerate(order[row]):
            labels[row, col] = names[j]
            top[row, col] = probs[row, j]
    outputs = {LABELS: labels, PROBS: top,
               INDEX: np.asarray(prediction.indices, np.int64).reshape(n, 1)}
    if embeddings is not None:
        outputs[EMBEDDING] = np.ascontiguousarray(embeddings, np.float32)
    return outputs


# ---------------------------------------------------------------- KServe v2 JSON

def tensor_from_json(spec: Mapping[str, Any], limits: ImageLimits = ImageLimits()) -> tuple[str, np.ndarray]:
    """A KServe v2 JSON tensor {name, datatype, shape, data} -> (name, array); data is row-major
    (flat or nested); sizes are checked before anything is allocated."""
    if not isinstance(spec, Mapping):
        raise RequestError(f"an input is a {type(spec).__name__}, expected an object with name, datatype, "
                           "shape and data")
    name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
    if not isinstance(name, str) or not name:
        raise RequestError(f"input name {name!r} is not a non-empty string")
    if datatype not in DATATYPES:
        raise RequestError(f"input {name!r}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise RequestError(f"input {name!r}: shape {shape!r} is not a list of at most 8 non-negative integers")
    count = math.prod(shape)
    if count > limits.max_json_elements:
        raise RequestError(f"input {name!r}: shape {shape} has {count:,} elements, more than the server's "
                           f"limit of {limits.max_json_elements:,}")
    data = _flatten(spec.get("data"), name, count)
    return name, _json_array(data, name, datatype).reshape(shape)


def _flatten(data: Any, name: str, count: int) -> list[Any]:
    if not isinstance(data, list):
        raise RequestError(f"input {name!r}: data is a {type(data).__name__}, expected a list")
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
            if len(flat) > count:
                raise RequestError(f"input {name!r}: data has more elements than its shape's {count}")
        else:
            stack.pop()
    if len(flat) != count:
        raise RequestError(f"input {name!r}: data has {len(flat)} elements, its shape says {count}")
    return flat


def _json_array(data: list[Any], name: str, datatype: str) -> np.ndarray:
    if datatype == "BYTES":
        if not all(isinstance(item, str) for item in data):
            raise RequestError(f"input {name!r}: BYTES data must be strings")
        out = np.empty(len(data), dtype=object)
        out[:] = [item.encode("utf-8") for item in data]
        return out
    if datatype == "BOOL":
        if not all(isinstance(item, bool) for item in data):
            raise RequestError(f"input {name!r}: BOOL data must be true or false")
        return np.asarray(data, np.bool_)
    dtype = np.dtype(DATATYPES[datatype])
    kind = (int,) if dtype.kind in "iu" else (int, float)
    if not all(isinstance(item, kind) and not isinstance(item, bool) for item in data):
        raise RequestError(f"input {name!r}: {datatype} data must be {'integers' if dtype.kind in 'iu' else 'numbers'}")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if data and (min(data) < info.min or max(data) > info.max):
            raise RequestError(f"input {name!r}: {datatype} values must lie in [{info.min}, {info.max}]")
    return np.asarray(data, dtype)


def tensor_to_json(name: str, array: np.ndarray) -> dict[str, Any]:
    """An output array -> a KServe v2 JSON tensor (BYTES as UTF-8 strings)."""
    datatype = _datatype(array)
    if datatype not in DATATYPES:
        raise InputError(f"output {name!r}: dtype {array.dtype} has no KServe v2 datatype")
    flat = array.reshape(-1)
    if datatype == "BYTES":
        data = [bytes(x).decode("utf-8", "replace") if isinstance(x, (bytes, np.bytes_)) else str(x) for x in flat]
    else:
        data = flat.tolist()
    return {"name": name, "datatype": datatype, "shape": [int(d) for d in array.shape], "data": data}


def inputs_from_json(body: Any, limits: ImageLimits = ImageLimits()) -> dict[str, np.ndarray]:
    """A KServe v2 JSON inference request body -> input name -> array (for decode_inputs)."""
    if not isinstance(body, Mapping) or not isinstance(body.get("inputs"), list):
        raise RequestError("request body must be a JSON object with an 'inputs' list (KServe v2)")
    if len(body["inputs"]) > len(INPUTS):
        raise RequestError(f"request has {len(body['inputs'])} inputs; send 'task' and one of 'image', "
                           "'image_bytes'")
    out: dict[str, np.ndarray] = {}
    for spec in body["inputs"]:
        name, array = tensor_from_json(spec, limits)
        if name in out:
            raise RequestError(f"input {name!r} given twice")
        out[name] = array
    return out


def response_to_json(model_name: str, outputs: Mapping[str, np.ndarray], request_id: str | None = None,
                     requested: Collection[str] | None = None) -> dict[str, Any]:
    """Output arrays -> a KServe v2 JSON inference response (only `requested` outputs when given)."""
    body: dict[str, Any] = {"model_name": model_name,
                            "outputs": [tensor_to_json(name, array) for name, array in outputs.items()
                                        if requested is None or name in requested]}
    if request_id is not None:
        body["id"] = request_id
    return body
