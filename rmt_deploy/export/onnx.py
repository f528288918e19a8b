"""ONNX graphs: the shared base (masked weights as named graph inputs) and folded per-task models.

The shared graph is traced once with the dynamo exporter from a wrapper whose
forward takes the masked weights as extra inputs (torch.func.functional_call),
so ORT's constant folding can never reach them. A folded model is the same
graph with those inputs turned into initializers (W * M) and the task's head
appended (rmt_deploy.artifacts.heads: the text head, plus Tip-Adapter's cache for those
kinds), built by graph surgery instead of a second trace. The constant graph is the shared
graph with the masked inputs turned into initializers whose data is external at SUPPLIED_AT_LOAD,
a location no file has: the runtime hands a resident task's buffers to it
(SessionOptions.add_external_initializers), so ONNX Runtime prepacks them like a folded model's.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from rmt_deploy.artifacts.bundle import EMBEDDING_OUTPUT, IMAGE_INPUT, LOGITS_OUTPUT
from rmt_deploy.artifacts.heads import Cache
from rmt_deploy.errors import InternalError, require

BATCH_DIM = "batch"
# protobuf cannot serialise more than 2 GiB; above this many weight bytes, files use external data
EXTERNAL_DATA_BYTES = 1 << 30
_TRACE_BATCH = 2  # a trace with batch 1 would fix the batch dimension at 1
SUPPLIED_AT_LOAD = "rmt-deploy-supplied-at-load"  # external-data location of the constant graph's masked weights


def input_name(tensor_name: str) -> str:
    """The graph input name of a masked tensor: its open_clip name with non-word characters as '_'."""
    return re.sub(r"\W", "_", tensor_name)


def input_names(tensor_names: list[str]) -> dict[str, str]:
    """open_clip name -> graph input name, checked to be unique and distinct from the image input."""
    names = {name: input_name(name) for name in tensor_names}
    taken = list(names.values()) + [IMAGE_INPUT]
    if len(set(taken)) != len(taken):
        raise InternalError(f"masked tensor input names collide: {sorted(taken)}")
    return names


def _encoder_module(visual: Any, names: list[str], compute_dtype: Any) -> Any:
    """A torch module: (image, [masked weights]) -> L2-normalised embedding, weights substituted by name."""
    torch = require("torch", "train")
    from torch.func import functional_call

    class SharedEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = visual
            self.names = list(names)

        def forward(self, image: Any, weights: list) -> Any:
            params = dict(zip(self.names, weights))
            features = functional_call(self.visual, params, (image.to(compute_dtype),), strict=False)
            return torch.nn.functional.normalize(features.float(), dim=-1)

    return SharedEncoder().eval()


def export_shared(visual: Any, masked_names: list[str], image_size: list[int], opset: int,
                  max_batch: int, fp16: bool = False) -> Any:
    """Trace the image encoder into an onnx_ir Model: inputs image + masked weights, output embedding.

    `masked_names` are open_clip names ("visual.transformer..."); `visual` is the fp32 encoder.
    With fp16, weights and activations are fp16, LayerNorm and softmax fp32, image and embedding fp32.
    """
    torch = require("torch", "train")
    from rmt_deploy.export import fp16 as fp16_pass

    module_visual = fp16_pass.half_encoder(visual) if fp16 else visual
    dtype = torch.float16 if fp16 else torch.float32
    relative = [_relative(name) for name in masked_names]
    wrapper = _encoder_module(module_visual, relative, dtype)
    for param in wrapper.parameters():
        param.requires_grad_(False)
    weights = [module_visual.get_parameter(name).detach().clone() for name in relative]
    image = torch.zeros(_TRACE_BATCH, 3, *image_size)
    batch = torch.export.Dim(BATCH_DIM, min=1, max=max(max_batch, _TRACE_BATCH, 1024))
    names = [IMAGE_INPUT] + list(input_names(masked_names).values())
    with warnings.catch_warnings():
        # the exporter warns that it cannot rename the batch axis; _name_batch_dim does it
        warnings.simplefilter("ignore", UserWarning)
        program = torch.onnx.export(
            wrapper, (image, weights), dynamo=True, input_names=names, output_names=[EMBEDDING_OUTPUT],
            dynamic_shapes=({0: batch}, [None] * len(weights)), opset_version=opset, verbose=False,
        )
    model = program.model
    _name_batch_dim(model)
    if fp16:
        fp16_pass.softmax_in_fp32(model)
    return model


def _relative(name: str) -> str:
    if not name.startswith("visual."):
        raise InternalError(f"masked tensor {name!r} is not in the image encoder")
    return name[len("visual."):]


def _name_batch_dim(model: Any) -> None:
    """Rename the exporter's symbol for the image batch (e.g. 's40') to 'batch' everywhere."""
    ir = require("onnx_ir", "train")
    image = model.graph.inputs[0]
    symbol = image.shape[0]
    if not isinstance(symbol, ir.SymbolicDim) or symbol.value is None:
        raise InternalError(f"the exported image input has a static batch dimension ({image.shape})")
    old = symbol.value
    values = list(model.graph.inputs) + list(model.graph.outputs)
    values += [out for node in model.graph for out in node.outputs]
    for value in values:
        if value.shape is None:
            continue
        dims = [BATCH_DIM if isinstance(d, ir.SymbolicDim) and d.value == old else d for d in value.shape]
        value.shape = ir.Shape(dims)


def set_defaults(model: Any, base_values: Mapping[str, np.ndarray]) -> None:
    """Give masked inputs (by graph input name) initializer defaults holding the base values."""
    ir = require("onnx_ir", "train")
    inputs = {value.name: value for value in model.graph.inputs}
    for name, array in base_values.items():
        value = inputs[name]
        value.const_value = ir.tensor(np.ascontiguousarray(array), name=name)
        model.graph.register_initializer(value)


def constant_graph(shared_path: Path, masked_names: list[str]) -> Any:
    """The shared graph with its masked inputs (graph input names) as initializers stored nowhere: each is
    external data at SUPPLIED_AT_LOAD, which a session must be given (add_external_initializers)."""
    ir = require("onnx_ir", "train")
    model = ir.load(shared_path)
    graph = model.graph
    inputs = {value.name: value for value in graph.inputs}
    for name in masked_names:
        value = inputs[name]
        graph.inputs.remove(value)
        shape = [int(dim) for dim in value.shape]
        nbytes = int(np.prod(shape, dtype=np.int64)) * value.dtype.itemsize
        value.const_value = ir.ExternalTensor(SUPPLIED_AT_LOAD, 0, nbytes, value.dtype, shape=ir.Shape(shape),
                                              name=name)
        if name not in graph.initializers:
            graph.register_initializer(value)
    return model


def fold_task(shared_path: Path, masked_values: Mapping[str, np.ndarray], head: np.ndarray,
              logit_scale: float, cache: Cache | None = None) -> Any:
    """A folded model from the shared graph: masked inputs become initializers W*M, head appended.

    `masked_values` maps graph input name -> masked weight in the input's dtype. Output `logits`
    float32 [batch, classes] = logit_scale * embedding @ head.T (+ alpha * exp(beta * (embedding @
    keys.T - 1)) @ onehot(labels) with a Tip-Adapter cache), the runtime's formula.
    """
    ir = require("onnx_ir", "train")
    model = ir.load(shared_path)
    graph = model.graph
    inputs = {value.name: value for value in graph.inputs}
    missing = set(masked_values) - set(inputs)
    if missing:
        raise InternalError(f"shared graph has no inputs {sorted(missing)}")
    for name, array in masked_values.items():
        value = inputs[name]
        graph.inputs.remove(value)
        value.const_value = ir.tensor(np.ascontiguousarray(array), name=name)
        if name not in graph.initializers:
            graph.register_initializer(value)
    embedding = graph.outputs[0]
    batch = embedding.shape[0] if embedding.shape is not None else BATCH_DIM
    head_t = _constant(graph, "task_head_t", np.ascontiguousarray(head.T, dtype=np.float32))
    scale = _constant(graph, "task_logit_scale", np.asarray(logit_scale, dtype=np.float32))
    classes = head.shape[0]
    cosine = _node(graph, "MatMul", [embedding, head_t], "task_cosine", [batch, classes])
    if cache is None:
        logits = _node(graph, "Mul", [cosine, scale], LOGITS_OUTPUT, [batch, classes])
    else:
        text_logits = _node(graph, "Mul", [cosine, scale], "task_text_logits", [batch, classes])
        logits = _node(graph, "Add", [text_logits, _cache_logits(graph, embedding, batch, cache, classes)],
                       LOGITS_OUTPUT, [batch, classes])
    graph.outputs.clear()
    graph.outputs.append(logits)
    return model


def _cache_logits(graph: Any, embedding: Any, batch: Any, cache: Cache, classes: int) -> Any:
    """alpha * exp(beta * (embedding @ keys.T - 1)) @ onehot(labels), as the runtime computes it."""
    count = int(cache.labels.size)
    keys_t = _constant(graph, "task_cache_keys_t", np.ascontiguousarray(cache.keys.astype(np.float32).T))
    values = _constant(graph, "task_cache_values", cache.values(classes))
    one = _constant(graph, "task_cache_one", np.asarray(1.0, dtype=np.float32))
    beta = _constant(graph, "task_cache_beta", np.asarray(cache.beta, dtype=np.float32))
    alpha = _constant(graph, "task_cache_alpha", np.asarray(cache.alpha, dtype=np.float32))
    affinity = _node(graph, "MatMul", [embedding, keys_t], "task_cache_affinity", [batch, count])
    shifted = _node(graph, "Sub", [affinity, one], "task_cache_shifted", [batch, count])
    scaled = _node(graph, "Mul", [shifted, beta], "task_cache_scaled", [batch, count])
    weights = _node(graph, "Exp", [scaled], "task_cache_weights", [batch, count])
    votes = _node(graph, "MatMul", [weights, values], "task_cache_votes", [batch, classes])
    return _node(graph, "Mul", [votes, alpha], "task_cache_logits", [batch, classes])


def _node(graph: Any, op: str, inputs: list, name: str, shape: list) -> Any:
    """Append one float32 op with a single named output of `shape`; returns the output value."""
    ir = require("onnx_ir", "train")
    out = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shape))
    graph.append(ir.Node("", op, inputs, outputs=[out]))
    return out


def _constant(graph: Any, name: str, array: np.ndarray) -> Any:
    ir = require("onnx_ir", "train")
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name),
                     type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(list(array.shape)))
    graph.register_initializer(value)
    return value


def save_constant_graph(model: Any, path: Path, metadata: Mapping[str, str]) -> None:
    """Save a constant graph in one file: its masked weights stay references to SUPPLIED_AT_LOAD."""
    ir = require("onnx_ir", "train")
    for key, text in {**metadata, "rmt_deploy.masked_inputs": "supplied"}.items():
        model.metadata_props[key] = str(text)
    ir.save(model, path)


def weight_bytes(model: Any) -> int:
    """Bytes held by a model's initializers."""
    return sum(int(v.const_value.nbytes) for v in model.graph.initializers.values() if v.const_value is not None)


def save_model(model: Any, path: Path, metadata: Mapping[str, str] | None = None) -> list[Path]:
    """Save an onnx_ir model; weights above EXTERNAL_DATA_BYTES go to '<name>.data'. Returns files written."""
    ir = require("onnx_ir", "train")
    for key, text in (metadata or {}).items():
        model.metadata_props[key] = str(text)
    if weight_bytes(model) > EXTERNAL_DATA_BYTES:
        data = path.with_name(path.name + ".data")
        ir.save(model, path, external_data=data.name)
        return [path, data]
    ir.save(model, path)
    return [path]

