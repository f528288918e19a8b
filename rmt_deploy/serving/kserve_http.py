"""KServe v2 HTTP bodies for ingresses that are not Triton (Ray Serve): JSON, and Triton's
binary tensor data extension, so a tritonclient.http client with its defaults
(binary_data=True) works here as it does against `rmt-deploy serve`.

Binary extension: the body is a JSON header of `Inference-Header-Content-Length` bytes
followed by the raw tensors, in input order, each input naming its size in
`parameters.binary_data_size`; BYTES elements are a 4-byte little-endian length and the
bytes. Outputs come back binary when the request asks (`binary_data_output`, or
`parameters.binary_data` on a requested output). Sizes are checked before anything is
allocated. No server imports here.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from rmt_deploy.serving.protocol import DATATYPES, INPUTS, ImageLimits, RequestError, tensor_from_json, tensor_to_json

__all__ = ["HEADER_LENGTH", "InferRequest", "parse_infer_request", "encode_infer_response", "error_body"]

HEADER_LENGTH = "inference-header-content-length"
MAX_HEADER_BYTES = 1 << 20


@dataclass(frozen=True)
class InferRequest:
    """A parsed inference request: input arrays, the client's id, which outputs and in what form."""

    inputs: dict[str, np.ndarray]
    request_id: str | None
    outputs: dict[str, bool] | None     # requested output -> binary?; None: all outputs
    binary_default: bool                # binary_data_output: the form of outputs not named


def parse_infer_request(body: bytes, header_length: str | None,
                        limits: ImageLimits = ImageLimits()) -> InferRequest:
    """A KServe v2 request body (JSON, or JSON header + binary tensors) -> InferRequest."""
    if header_length is None:
        head, rest = body, b""
    else:
        try:
            size = int(header_length)
        except ValueError:
            raise RequestError(f"Inference-Header-Content-Length {header_length[:40]!r} is not an integer") from None
        if not 0 < size <= min(len(body), MAX_HEADER_BYTES):
            raise RequestError(f"Inference-Header-Content-Length {size} is outside the body's "
                               f"{len(body):,} bytes")
        head, rest = body[:size], body[size:]
    try:
        request = json.loads(head)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError(f"request body is not JSON ({str(exc)[:120]}); send a KServe v2 inference request "
                           "(binary tensors need the Inference-Header-Content-Length header)") from None
    if not isinstance(request, Mapping) or not isinstance(request.get("inputs"), list):
        raise RequestError("request body must be a JSON object with an 'inputs' list (KServe v2)")
    if len(request["inputs"]) > len(INPUTS):
        raise RequestError(f"request has {len(request['inputs'])} inputs; send 'task' and one of 'image', "
                           "'image_bytes'")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for spec in request["inputs"]:
        size = _binary_size(spec)
        if size is None:
            name, array = tensor_from_json(spec, limits)
        else:
            if offset + size > len(rest):
                raise RequestError(f"input {spec.get('name')!r}: binary_data_size {size} runs past the body's "
                                   f"{len(rest):,} bytes of tensor data")
            name, array = _tensor_from_binary(spec, rest[offset:offset + size], limits)
            offset += size
        if name in inputs:
            raise RequestError(f"input {name!r} given twice")
        inputs[name] = array
    if offset != len(rest):
        raise RequestError(f"{len(rest) - offset:,} bytes of tensor data follow the inputs: "
                           "check each input's binary_data_size")
    return InferRequest(inputs, _request_id(request), _requested(request), _binary_output(request))


def _binary_size(spec: Any) -> int | None:
    params = spec.get("parameters") if isinstance(spec, Mapping) else None
    if not isinstance(params, Mapping) or "binary_data_size" not in params:
        return None
    size = params["binary_data_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RequestError(f"input {spec.get('name')!r}: binary_data_size {size!r} is not a byte count")
    return size


def _tensor_from_binary(spec: Mapping[str, Any], data: bytes, limits: ImageLimits) -> tuple[str, np.ndarray]:
    """A binary-extension tensor -> (name, array), checked against its declared shape."""
    name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
    # reuse the JSON checks of name, datatype and shape on an empty stand-in
    tensor_from_json({"name": name, "datatype": datatype, "shape": [0], "data": []}, limits)
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise RequestError(f"input {name!r}: shape {shape!r} is not a list of at most 8 non-negative integers")
    count = math.prod(shape)
    if datatype == "BYTES":
        return name, _bytes_from_binary(name, data, count, limits).reshape(shape)
    dtype = np.dtype(DATATYPES[datatype])
    if count * dtype.itemsize != len(data):
        raise RequestError(f"input {name!r}: {len(data):,} bytes of {datatype} data, its shape {shape} needs "
                           f"{count * dtype.itemsize:,}")
    return name, np.frombuffer(data, dtype).reshape(shape)


def _bytes_from_binary(name: str, data: bytes, count: int, limits: ImageLimits) -> np.ndarray:
    if count > limits.max_samples:
        raise RequestError(f"input {name!r}: {count} BYTES elements, more than {limits.max_samples}")
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > len(data):
            raise RequestError(f"input {name!r}: BYTES data ends before element {i} of {count}")
        (length,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if pos + length > len(data):
            raise RequestError(f"input {name!r}: BYTES element {i} says {length:,} bytes, "
                               f"{len(data) - pos:,} remain")
        out[i] = data[pos:pos + length]
        pos += length
    if pos != len(data):
        raise RequestError(f"input {name!r}: {len(data) - pos:,} bytes left after its {count} BYTES elements")
    return out


def _request_id(request: Mapping[str, Any]) -> str | None:
    value = request.get("id")
    return value if isinstance(value, str) else None


def _requested(request: Mapping[str, Any]) -> dict[str, bool] | None:
    outputs = request.get("outputs")
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(isinstance(o, Mapping) and isinstance(o.get("name"), str)
                                                for o in outputs):
        raise RequestError("'outputs' must be a list of objects with a 'name'")
    return {o["name"]: bool((o.get("parameters") or {}).get("binary_data", False)) for o in outputs}


def _binary_output(request: Mapping[str, Any]) -> bool:
    params = request.get("parameters")
    return bool(params.get("binary_data_output", False)) if isinstance(params, Mapping) else False


def encode_infer_response(model_name: str, outputs: Mapping[str, np.ndarray], request: InferRequest,
                          ) -> tuple[bytes, dict[str, str]]:
    """Output arrays -> (body, extra headers): JSON, with the outputs asked for in binary appended."""
    wanted = request.outputs
    if wanted is not None:
        unknown = sorted(set(wanted) - set(outputs))
        if unknown:
            raise RequestError(f"output {unknown[0]!r} is not one of {', '.join(outputs)}")
    tensors, chunks = [], []
    for name, array in outputs.items():
        if wanted is not None and name not in wanted:
            continue
        binary = request.binary_default if wanted is None else wanted[name]
        if not binary:
            tensors.append(tensor_to_json(name, array))
            continue
        raw = _binary_tensor(array)
        spec = tensor_to_json(name, array[:0] if array.ndim else array)
        spec.update(shape=[int(d) for d in array.shape], parameters={"binary_data_size": len(raw)})
        spec.pop("data", None)
        tensors.append(spec)
        chunks.append(raw)
    body: dict[str, Any] = {"model_name": model_name, "outputs": tensors}
    if request.request_id is not None:
        body["id"] = request.request_id
    head = json.dumps(body).encode()
    if not chunks:
        return head, {"content-type": "application/json"}
    return head + b"".join(chunks), {"content-type": "application/octet-stream",
                                     HEADER_LENGTH: str(len(head))}


def _binary_tensor(array: np.ndarray) -> bytes:
    if array.dtype.kind in "OSU":
        parts = []
        for item in array.reshape(-1):
            raw = item.encode("utf-8") if isinstance(item, str) else bytes(item)
            parts.append(struct.pack("<I", len(raw)) + raw)
        return b"".join(parts)
    return np.ascontiguousarray(array).tobytes()


def error_body(message: str) -> bytes:
    """The KServe v2 error body: {"error": "..."}."""
    return json.dumps({"error": message}).encode()
