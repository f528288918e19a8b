"""FP16 export: fp16 weights and activations, LayerNorm and softmax in fp32, close to fp32 torch."""
from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def fp16_bundle(make_bundle, task_specs):
    out = make_bundle(task_specs.two, mode="both", fp16=True)
    return out, make_bundle.report(out)


def test_fp16_report_gives_error_and_top1_agreement_within_tolerance(fp16_bundle):
    from rmt_deploy.export.verify import FP16_TOLERANCE

    _, report = fp16_bundle
    assert report.precision == "fp16" and report.verified
    assert {(c.task, c.kind) for c in report.checks} == {(t, k) for t in ("alpha", "beta")
                                                        for k in ("shared", "folded")} | {("alpha", "constant")}
    for check in report.checks:
        assert 0 < check.rel_l2 <= FP16_TOLERANCE  # not zero: it really is fp16
        assert check.top1 == 1.0
    assert "top-1" in report.table()


def test_fp16_folded_logits_match_fp32_torch(refs, fp16_bundle, task_files, tiny_base):
    from rmt_deploy.artifacts.task_file import TaskPack

    out, _ = fp16_bundle
    images = np.random.default_rng(3).standard_normal((8, 3, 32, 32)).astype(np.float32)
    for path in task_files:
        pack = TaskPack.load(path)
        logits = refs.ort_session(out / "folded" / f"{pack.name}.onnx").run(["logits"], {"image": images})[0]
        reference = refs.masked_torch_logits(tiny_base.model.visual, pack, images)
        assert logits.dtype == np.float32
        assert refs.rel_l2(logits, reference) <= 2e-2
        assert np.mean(logits.argmax(1) == reference.argmax(1)) >= 0.75


def test_fp16_graph_keeps_layernorm_and_softmax_in_fp32(fp16_bundle):
    out, _ = fp16_bundle
    model = onnx.shape_inference.infer_shapes(onnx.load(str(out / "base.onnx")), strict_mode=True)
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({i.name: i.data_type for i in graph.initializer})
    float32, float16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    norms = [n for n in graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert len(norms) >= 4
    for node in norms:
        assert all(types[name] == float32 for name in node.input if name), node.name
    matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    assert any(types[n.input[0]] == float16 for n in matmuls), "activations should be fp16"
    inputs = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    assert inputs.pop("image") == float32 and set(inputs.values()) == {float16}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "fp16"
    assert {t["dtype"] for t in manifest["masked_tensors"]} == {"float16"}


def test_fp16_bundle_with_a_flipped_base_weight_byte_is_refused(fp16_bundle, copy_bundle, tmp_path):
    """fp16 base values cannot be checked against the fp32 fingerprint: the file's sha256 catches it."""
    from rmt_deploy.errors import ArtifactError
    from rmt_deploy.runtime.engine import Engine

    out, _ = fp16_bundle
    root = copy_bundle(out, tmp_path)
    path = root / "base_weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last byte is tensor data: one fp16 value changes slightly
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"base_weights\.safetensors: sha256 .*rebuild the bundle"):
        Engine.load(root, threads=1)
    with Engine.load(out, threads=1) as engine:  # the intact bundle still loads
        assert engine.backend == "onnxruntime-cpu"
