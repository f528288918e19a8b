"""Shared and folded ONNX bundles on the tiny model: layout, manifest, and agreement with torch."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

TINY_MODEL = "rmt-tiny-vit"


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(7).standard_normal((3, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def packs(task_files):
    from rmt_deploy.artifacts.task_file import TaskPack

    return [TaskPack.load(path) for path in task_files]


def test_bundle_has_manifest_base_tasks_and_folded_models(bundle_dir, tiny_base):
    from rmt_deploy.artifacts.bundle import Bundle
    from rmt_deploy.basemodel.loading import fingerprint, maskable_tensors

    bundle = Bundle.open(bundle_dir)
    manifest = bundle.manifest
    assert manifest.tasks == ["alpha", "beta"]
    assert manifest.fingerprint == fingerprint(TINY_MODEL, maskable_tensors(tiny_base.model))
    assert manifest.files["onnx"] == {"base": "base.onnx", "constant": "base_constant.onnx",
                                      "folded": {"alpha": "folded/alpha.onnx", "beta": "folded/beta.onnx"}}
    assert manifest.masked_inputs == "required" and manifest.base_weights == "base_weights.safetensors"
    assert manifest.preprocess.image_size == [32, 32] and manifest.output_kind == "embedding"
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest.tools)
    assert [bundle.load_task(t).name for t in bundle.tasks] == ["alpha", "beta"]
    assert bundle.folded_path("beta").is_file()
    assert not [p for p in bundle_dir.parent.iterdir() if p.name.startswith(".")], "staging dir left behind"


def test_masked_tensors_are_named_required_inputs_with_base_values_beside(bundle_dir, tiny_base):
    from safetensors.numpy import load_file

    from rmt_deploy.artifacts.bundle import Bundle
    from rmt_deploy.basemodel.loading import maskable_tensors

    manifest = Bundle.open(bundle_dir).manifest
    graph = onnx.load(str(bundle_dir / "base.onnx")).graph
    inputs = {i.name: i for i in graph.input}
    initializers = {i.name for i in graph.initializer}
    expected = maskable_tensors(tiny_base.model)
    assert [t.name for t in manifest.masked_tensors] == list(expected)
    weights = load_file(str(bundle_dir / "base_weights.safetensors"))
    for tensor in manifest.masked_tensors:
        assert tensor.input_name == tensor.name.replace(".", "_")
        assert tensor.input_name in inputs and tensor.input_name not in initializers
        np.testing.assert_array_equal(weights[tensor.name], expected[tensor.name].detach().numpy())
    batch = inputs["image"].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "batch"
    assert [o.name for o in graph.output] == ["embedding"]


def test_feed_swap_between_two_tasks_matches_torch_at_enable_all(refs, bundle_dir, packs, tiny_base, images):
    from safetensors.numpy import load_file

    session = refs.ort_session(bundle_dir / "base.onnx")
    base = load_file(str(bundle_dir / "base_weights.safetensors"))
    outputs = {}
    for pack in [packs[0], packs[1], packs[0]]:  # swap there and back on one session
        feeds = {n.replace(".", "_"): base[n] * pack.masks[n] for n in base}
        embedding = session.run(["embedding"], {"image": images, **feeds})[0]
        logits = pack.logit_scale * embedding @ pack.head.T
        assert refs.rel_l2(logits, refs.masked_torch_logits(tiny_base.model.visual, pack, images)) <= 1e-5
        outputs.setdefault(pack.name, []).append(embedding)
    np.testing.assert_array_equal(outputs["alpha"][0], outputs["alpha"][1])
    assert refs.rel_l2(outputs["alpha"][0], outputs["beta"][0]) > 1e-3, "feeding another task changed nothing"


def test_folded_equals_shared_equals_torch(refs, bundle_dir, packs, tiny_base, images):
    from safetensors.numpy import load_file

    shared = refs.ort_session(bundle_dir / "base.onnx")
    base = load_file(str(bundle_dir / "base_weights.safetensors"))
    for pack in packs:
        folded = refs.ort_session(bundle_dir / "folded" / f"{pack.name}.onnx")
        folded_logits = folded.run(["logits"], {"image": images})[0]
        feeds = {n.replace(".", "_"): base[n] * pack.masks[n] for n in base}
        shared_logits = pack.logit_scale * shared.run(["embedding"], {"image": images, **feeds})[0] @ pack.head.T
        reference = refs.masked_torch_logits(tiny_base.model.visual, pack, images)
        assert folded_logits.shape == (3, len(pack.class_names))
        assert refs.rel_l2(folded_logits, reference) <= 1e-5
        assert refs.rel_l2(folded_logits, shared_logits) <= 1e-5


def test_folded_model_is_plain_onnx_image_to_logits(bundle_dir):
    model = onnx.load(str(bundle_dir / "folded" / "alpha.onnx"))
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}, "needs no custom operators"
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    onnx.checker.check_model(model, full_check=True)


def test_manifest_is_json_with_every_documented_field(bundle_dir):
    data = json.loads((bundle_dir / "manifest.json").read_text())
    for key in ("format", "version", "model_name", "pretrained", "fingerprint", "preprocess", "masked_tensors",
                "output_kind", "tasks", "files", "tools", "masked_inputs", "base_weights", "base_weights_sha256",
                "precision"):
        assert key in data, key
    digest = hashlib.sha256((bundle_dir / data["base_weights"]).read_bytes()).hexdigest()
    assert data["base_weights_sha256"] == digest
    assert set(data["preprocess"]) >= {"image_size", "mean", "std", "interpolation", "resize_mode"}
    assert set(data["masked_tensors"][0]) == {"name", "shape", "dtype", "input_name"}


def test_defaults_mode_runs_unfed_as_the_base_and_fed_as_the_task(refs, make_bundle, make_taskpack, task_specs,
                                                                  tiny_base, images):
    import torch

    # the same bundle as tests/runtime/test_engine_onnx.py's defaults test: one export for both
    out = make_bundle(task_specs.three[:2], mode="shared", masked_inputs="defaults", max_batch=4)
    pack = make_taskpack(*task_specs.three[0])
    model = onnx.load(str(out / "base.onnx"))
    names = {i.name for i in model.graph.initializer}
    masked = [i.name for i in model.graph.input if i.name != "image"]
    assert masked and set(masked) <= names
    session = refs.ort_session(out / "base.onnx")
    unfed = session.run(["embedding"], {"image": images})[0]
    with torch.no_grad():
        base = torch.nn.functional.normalize(tiny_base.model.visual(torch.from_numpy(images)), dim=-1).numpy()
    assert refs.rel_l2(unfed, base) <= 1e-5
    from safetensors.numpy import load_file

    weights = load_file(str(out / "base_weights.safetensors"))
    feeds = {n.replace(".", "_"): weights[n] * pack.masks[n] for n in weights}
    fed = session.run(["embedding"], {"image": images, **feeds})[0]
    reference = refs.masked_torch_logits(tiny_base.model.visual, pack, images)
    assert refs.rel_l2(pack.logit_scale * fed @ pack.head.T, reference) <= 1e-5
    assert json.loads((out / "manifest.json").read_text())["masked_inputs"] == "defaults"


def test_large_models_use_external_data(refs, tiny_checkpoint, task_files, tiny_base, packs, images, tmp_path,
                                        monkeypatch):
    """Above the protobuf limit weights go to '<file>.data'; checked here by lowering the threshold."""
    from rmt_deploy.export import ExportConfig, export_bundle
    from rmt_deploy.export import onnx as graphs

    monkeypatch.setattr(graphs, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "external"
    report = export_bundle(ExportConfig(TINY_MODEL, str(tiny_checkpoint), task_files[:1], out, mode="both"),
                           progress=False)
    assert report.verified  # onnx.checker ran on the path, ORT loaded the external data
    assert {"base.onnx.data", "folded/alpha.onnx.data"} <= set(report.files)
    assert report.files["base.onnx.data"] > 100_000
    logits = refs.ort_session(out / "folded" / "alpha.onnx").run(["logits"], {"image": images})[0]
    assert refs.rel_l2(logits, refs.masked_torch_logits(tiny_base.model.visual, packs[0], images)) <= 1e-5


def test_folded_mode_writes_no_shared_graph(make_bundle, task_specs):
    from rmt_deploy.artifacts.bundle import Bundle

    out = make_bundle(task_specs.two, mode="folded")
    report = make_bundle.report(out)
    assert sorted(p.name for p in out.iterdir()) == ["folded", "manifest.json", "tasks"]
    manifest = Bundle.open(out).manifest
    assert manifest.files == {"onnx": {"folded": {"alpha": "folded/alpha.onnx", "beta": "folded/beta.onnx"}}}
    assert manifest.base_weights == "" and manifest.base_weights_sha256 == ""
    assert {c.kind for c in report.checks} == {"folded"}
