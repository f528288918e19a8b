"""TensorRT: the parts that need no GPU (build plan, refit map, names, manifest) and a GPU build test."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from rmt_deploy.artifacts import tensorrt_files as files
from rmt_deploy.errors import MissingDependencyError
from rmt_deploy.export import tensorrt as rt

TINY_MODEL = "rmt-tiny-vit"


def _has_tensorrt_gpu() -> tuple[bool, str]:
    if importlib.util.find_spec("tensorrt") is None:
        return False, "tensorrt is not installed (it installs only where an NVIDIA driver is present)"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, ""


def test_shared_plan_refits_only_the_masked_weights_individually():
    plan = rt.plan_build("10.8.0", shared=True, precision="fp32", max_batch=16, image_shape=[3, 32, 32],
                         refittable=("w_a", "w_b"))
    assert plan.flags == ("REFIT_INDIVIDUAL",)
    assert "REFIT" not in plan.flags and "REFIT_IDENTICAL" not in plan.flags
    assert plan.refittable == ("w_a", "w_b")
    assert plan.cleared_flags == ("TF32",), "fp32 engines must not use TF32 to match torch"
    assert plan.profile == {"image": [[1, 3, 32, 32], [8, 3, 32, 32], [16, 3, 32, 32]]}


def test_folded_fp16_plan_is_strongly_typed_without_precision_flags():
    for version in ("10.3.0", "11.4.1"):  # TensorRT 11 has no FP16 builder flag: the types are in the graph
        plan = rt.plan_build(version, shared=False, precision="fp16", max_batch=4, image_shape=[3, 224, 224])
        assert plan.strongly_typed and plan.flags == () and plan.refittable == ()
        assert "FP16" not in plan.flags
        assert plan.profile["image"][0][0] == 1 and plan.profile["image"][2][0] == 4


def test_tensorrt_older_than_10_is_refused():
    with pytest.raises(MissingDependencyError, match="TensorRT 8.6.1 is too old"):
        rt.plan_build("8.6.1", shared=False, precision="fp32", max_batch=1, image_shape=[3, 8, 8])


def test_engine_files_are_named_after_the_gpu():
    assert files.engine_file_name("base", "NVIDIA H200") == "base.nvidia-h200.plan"
    assert files.engine_file_name("folded/dtd", "NVIDIA GeForce RTX 4090") == "folded/dtd.nvidia-geforce-rtx-4090.plan"


def test_engine_mismatch_names_gpu_or_version():
    meta = {"version": "10.8.0.43", "gpu": {"name": "NVIDIA H200", "compute_capability": "9.0"}}
    assert files.engine_mismatch(meta, "NVIDIA H200", "10.8.0.43") is None
    assert "built for GPU 'NVIDIA H200'" in files.engine_mismatch(meta, "NVIDIA L4", "10.8.0.43")
    assert "TensorRT 10.8.0.43" in files.engine_mismatch(meta, "NVIDIA H200", "11.0.0")


def test_engine_mismatch_compares_the_full_tensorrt_version():
    """A plan runs only on the TensorRT version that built it: a different build number is a mismatch."""
    meta = {"version": "10.8.0.43", "gpu": {"name": "NVIDIA H200"}}
    why = files.engine_mismatch(meta, "NVIDIA H200", "10.8.0.44")
    assert why is not None
    assert "10.8.0.43" in why and "10.8.0.44" in why and "--target trt on this machine" in why
    assert files.engine_mismatch({"gpu": {"name": "NVIDIA H200"}}, "NVIDIA H200", "10.8.0.43") is not None


def _graph_with_uses(uses: list[tuple[str, list[int] | None]], shape=(4, 6)):
    """An onnx_ir model whose input `w` is consumed by the listed nodes: ("Transpose", perm) or ("Relu", None)."""
    import onnx
    import onnx_ir as ir
    from onnx import TensorProto, helper

    nodes, outputs = [], []
    for i, (op, perm) in enumerate(uses):
        attrs = {"perm": perm} if op == "Transpose" and perm is not None else {}
        nodes.append(helper.make_node(op, ["w"], [f"y{i}"], **attrs))
        out_shape = [shape[p] for p in perm] if perm is not None else (
            list(reversed(shape)) if op == "Transpose" else list(shape))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, out_shape))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("w", TensorProto.FLOAT, list(shape))],
                              outputs)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(proto)
    return ir.from_proto(proto)


def test_refit_map_on_a_hand_built_graph():
    plain = rt.refit_map(_graph_with_uses([("Relu", None)]), {"t": "w"})["t"]
    assert plain.perm is None and plain.shape == [4, 6] and plain.weights == "w" and plain.dtype == "float32"
    both = rt.refit_map(_graph_with_uses([("Transpose", [1, 0]), ("Transpose", None)]), {"t": "w"})["t"]
    assert both.perm == [1, 0] and both.shape == [6, 4]  # no perm attribute = reversed axes


def test_refit_map_refuses_a_weight_read_both_transposed_and_not():
    from rmt_deploy.errors import InternalError

    with pytest.raises(InternalError, match="both through Transpose and directly"):
        rt.refit_map(_graph_with_uses([("Transpose", [1, 0]), ("Relu", None)]), {"t": "w"})


def test_refit_map_refuses_different_permutations():
    from rmt_deploy.errors import InternalError

    model = _graph_with_uses([("Transpose", [1, 0, 2]), ("Transpose", [2, 1, 0])], shape=(2, 3, 4))
    with pytest.raises(InternalError, match="different permutations"):
        rt.refit_map(model, {"t": "w"})


def test_refit_map_from_the_shared_graph(bundle_dir):
    import onnx_ir as ir

    from rmt_deploy.artifacts.bundle import Bundle

    manifest = Bundle.open(bundle_dir).manifest
    names = {t.name: t.input_name for t in manifest.masked_tensors}
    refit = rt.refit_map(ir.load(bundle_dir / "base.onnx"), names)
    assert list(refit) == list(names)
    for tensor in manifest.masked_tensors:
        entry = refit[tensor.name]
        assert entry.weights == tensor.input_name and entry.dtype == "float32"
        if tensor.name.endswith("in_proj_weight"):  # read through a Transpose: stored pre-transposed
            assert entry.perm == [1, 0] and entry.shape == tensor.shape[::-1]
        else:
            assert entry.shape == tensor.shape


def test_refittable_graph_computes_what_the_shared_graph_computes(refs, bundle_dir, task_files, tmp_path):
    """The ONNX handed to TensorRT (masked weights as named initializers) is checked on CPU with ORT."""
    import onnx
    import onnx_ir as ir
    from safetensors.numpy import load_file

    from rmt_deploy.artifacts.bundle import Bundle
    from rmt_deploy.artifacts.task_file import TaskPack
    from rmt_deploy.export.engines import task_weights

    manifest = Bundle.open(bundle_dir).manifest
    names = {t.name: t.input_name for t in manifest.masked_tensors}
    model = ir.load(bundle_dir / "base.onnx")
    refit = rt.refit_map(model, names)
    pack = TaskPack.load(task_files[1])
    base = load_file(str(bundle_dir / "base_weights.safetensors"))
    masked = {n: base[n] * pack.masks[n] for n in base}
    rt.refittable_model(model, refit, masked)
    ir.save(model, tmp_path / "trt.onnx")
    proto = onnx.load(str(tmp_path / "trt.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["image"]
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    weights = task_weights(refit, base, pack)  # what a refit would push: same layout as the initializers
    for entry in refit.values():
        np.testing.assert_array_equal(initializers[entry.weights], weights[entry.weights])
    consumers = {n.op_type for n in proto.graph.node for name in n.input if name in weights}
    assert "Transpose" not in consumers

    images = np.random.default_rng(5).standard_normal((2, 3, 32, 32)).astype(np.float32)
    shared = refs.ort_session(bundle_dir / "base.onnx").run(
        ["embedding"], {"image": images, **{names[n]: w for n, w in masked.items()}})[0]
    refittable = refs.ort_session(tmp_path / "trt.onnx").run(["embedding"], {"image": images})[0]
    assert refs.rel_l2(refittable, shared) <= 1e-6


def test_tensorrt_manifest_entry_is_json(bundle_dir):
    import onnx_ir as ir

    from rmt_deploy.artifacts.bundle import Bundle

    manifest = Bundle.open(bundle_dir).manifest
    refit = rt.refit_map(ir.load(bundle_dir / "base.onnx"), {t.name: t.input_name for t in manifest.masked_tensors})
    plan = rt.plan_build("10.8.0", shared=True, precision="fp32", max_batch=8, image_shape=[3, 32, 32],
                         refittable=tuple(e.weights for e in refit.values()))
    entry = rt.tensorrt_manifest("10.8.0", {"name": "NVIDIA H200", "compute_capability": "9.0"}, "fp32", plan,
                                 refit, {"base": "base.nvidia-h200.plan"})
    data = json.loads(json.dumps(entry))
    assert data["refit"]["flag"] == "REFIT_INDIVIDUAL"
    assert set(data["refit"]["weights"]) == {t.name for t in manifest.masked_tensors}
    assert data["engines"]["base"] == "base.nvidia-h200.plan" and data["gpu"]["name"] == "NVIDIA H200"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_target_trt_without_tensorrt_says_so(task_files, tiny_checkpoint, tmp_path):
    from rmt_deploy.export import ExportConfig, export_bundle

    with pytest.raises(MissingDependencyError, match="TensorRT is not installed.*NVIDIA"):
        export_bundle(ExportConfig(TINY_MODEL, str(tiny_checkpoint), task_files, tmp_path / "b", target="trt"),
                      progress=False)
    assert not (tmp_path / "b").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not _has_tensorrt_gpu()[0], reason=_has_tensorrt_gpu()[1] or "needs TensorRT and a GPU")
def test_trt_bundle_builds_refits_and_matches_torch(task_files, tiny_checkpoint, tmp_path):
    from rmt_deploy.artifacts.bundle import Bundle
    from rmt_deploy.export import ExportConfig, export_bundle

    out = tmp_path / "trt"
    report = export_bundle(ExportConfig(TINY_MODEL, str(tiny_checkpoint), task_files, out, target="trt",
                                        mode="both", max_batch=8), progress=False)
    assert report.verified
    kinds = {c.kind for c in report.checks}
    assert {"tensorrt-shared", "tensorrt-folded"} <= kinds
    manifest = Bundle.open(out).manifest
    assert (out / manifest.files["tensorrt"]["base"]).is_file()
    assert set(manifest.tensorrt["refit"]["weights"]) == {t.name for t in manifest.masked_tensors}
