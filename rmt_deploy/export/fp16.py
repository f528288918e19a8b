"""FP16 export: fp16 weights and activations, LayerNorm and softmax kept in fp32.

LayerNorm overflows in fp16 are a known TensorRT issue, and softmax sums
lose precision, so both run in fp32 between explicit casts. The explicit
casts also make the graph usable as a strongly typed TensorRT network.
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np

from rmt_deploy.errors import require


def half_encoder(visual: Any) -> Any:
    """A fp16 copy of the image encoder whose LayerNorms compute (and keep their parameters) in fp32."""
    torch = require("torch", "train")

    class Fp32LayerNorm(torch.nn.Module):
        """Runs a fp32 LayerNorm on a fp16 input and casts the result back."""

        def __init__(self, norm: Any) -> None:
            super().__init__()
            self.norm = norm

        def forward(self, x: Any) -> Any:
            # the module's own forward: subclasses differ (timm's LayerNorm2d normalises channels first)
            return self.norm(x.float()).to(x.dtype)

    half = copy.deepcopy(visual).half().eval()
    originals = dict(visual.named_modules())
    for parent_name, parent in list(half.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.LayerNorm):
                full_name = f"{parent_name}.{child_name}" if parent_name else child_name
                norm = copy.deepcopy(originals[full_name]).float()
                setattr(parent, child_name, Fp32LayerNorm(norm))
    return half


def softmax_in_fp32(model: Any) -> int:
    """Wrap every fp16 Softmax of an onnx_ir model in casts to fp32 and back; returns how many."""
    ir = require("onnx_ir", "train")
    graph = model.graph
    wrapped = 0
    for node in list(graph):
        if node.op_type != "Softmax" or node.inputs[0].dtype != ir.DataType.FLOAT16:
            continue
        source, result = node.inputs[0], node.outputs[0]
        uses = list(result.uses())
        up = ir.Node("", "Cast", [source], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT)],
                     name=f"{node.name}_to_fp32")
        up.outputs[0].name = f"{source.name}_fp32"
        up.outputs[0].dtype = ir.DataType.FLOAT
        up.outputs[0].shape = source.shape
        graph.insert_before(node, up)
        node.replace_input_with(0, up.outputs[0])
        down = ir.Node("", "Cast", [result], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT16)],
                       name=f"{node.name}_to_fp16")
        down.outputs[0].name = f"{result.name}_fp16"
        down.outputs[0].dtype = ir.DataType.FLOAT16
        down.outputs[0].shape = result.shape
        result.dtype = ir.DataType.FLOAT
        graph.insert_after(node, down)
        for user, index in uses:
            user.replace_input_with(index, down.outputs[0])
        wrapped += 1
    return wrapped


def agreement(reference: np.ndarray, test: np.ndarray) -> tuple[float, float]:
    """(relative L2 error, top-1 agreement) of `test` against `reference`, both [batch, classes]."""
    reference = np.asarray(reference, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    rel = float(np.linalg.norm(test - reference) / max(np.linalg.norm(reference), 1e-30))
    top1 = float(np.mean(reference.argmax(axis=-1) == test.argmax(axis=-1)))
    return rel, top1
