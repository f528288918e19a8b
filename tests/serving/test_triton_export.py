"""`rmt-deploy export --target triton`: a model repository that tritonserver loads and serves."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
text_format = pytest.importorskip("google.protobuf.text_format")


@pytest.fixture(scope="module")
def repo(tiny_checkpoint, serve_task_files, tmp_path_factory) -> Path:
    from rmt_deploy.cli import main

    out = tmp_path_factory.mktemp("triton") / "repo"
    args = ["export", "--model", "rmt-tiny-vit", "--pretrained", str(tiny_checkpoint), "--out", str(out),
            "--target", "triton", "--mode", "folded", "--top-k", "4", "--quiet"]
    for path in serve_task_files:
        args += ["--task", str(path)]
    main(args)
    return out


def _config(path: Path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_every_config_parses_as_a_triton_model_config(repo, clients):
    import onnxruntime as ort

    assert sorted(p.name for p in repo.iterdir()) == sorted(["rmt", *clients.TASKS])
    engine = _config(repo / "rmt" / "config.pbtxt")
    assert engine.name == "rmt" and engine.backend == "python" and engine.max_batch_size == 32
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in engine.input] == [
        ("task", model_config_pb2.TYPE_STRING, [1], True),
        ("image", model_config_pb2.TYPE_UINT8, [-1, -1, 3], True),
        ("image_bytes", model_config_pb2.TYPE_STRING, [1], True)]
    assert [(o.name, list(o.dims)) for o in engine.output] == [
        ("labels", [4]), ("probs", [4]), ("index", [1]), ("embedding", [32])]
    assert engine.parameters["bundle"].string_value == "bundle"
    assert (repo / "rmt" / "1" / "bundle" / "manifest.json").is_file()
    for task, (_, classes) in clients.TASKS.items():
        folded = _config(repo / task / "config.pbtxt")
        assert folded.name == task and folded.platform == "onnxruntime_onnx"
        session = ort.InferenceSession(str(repo / task / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        assert [i.name for i in folded.input] == [i.name for i in session.get_inputs()]
        assert [o.name for o in folded.output] == [o.name for o in session.get_outputs()]
        assert list(folded.input[0].dims) == list(session.get_inputs()[0].shape[1:])
        assert list(folded.output[0].dims) == [classes]
        labels = (repo / task / folded.output[0].label_filename).read_text().splitlines()
        assert labels == [f"class {i}" for i in range(classes)]


def test_tritonserver_serves_the_exported_repository(repo, engine, images, clients, tmp_path):
    """The wheel's tritonserver has no onnxruntime backend: load the Engine model explicitly."""
    from rmt_deploy.serving.tritonserver import Ports, TritonServer

    ports = Ports(*clients.free_ports(3), host="127.0.0.1")
    server = TritonServer(repo, tmp_path, ports, tmp_path / "triton.log",
                          extra=["--model-control-mode=explicit", "--load-model=rmt"])
    try:
        server.wait_ready()
        import tritonclient.grpc as module

        client = module.InferenceServerClient(f"127.0.0.1:{ports.grpc}")
        try:
            for task in clients.TASKS:
                got = clients.infer("grpc", client, clients.request(module, task, images[3]))
                assert clients.mismatch(got, clients.expected(engine, task, images[3], 4)) is None, task
        finally:
            client.close()
    finally:
        assert server.stop() == 0, server.log_tail()


def test_export_to_an_existing_repository_is_refused_and_leaves_it_alone(repo, tiny_checkpoint,
                                                                          serve_task_files):
    import subprocess
    import sys

    before = sorted(str(p.relative_to(repo)) for p in repo.rglob("*"))
    result = subprocess.run([sys.executable, "-m", "rmt_deploy.cli", "export", "--model", "rmt-tiny-vit",
                             "--pretrained", str(tiny_checkpoint), "--task", str(serve_task_files[0]),
                             "--out", str(repo), "--target", "triton"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {repo} already exists; pass --force to replace it"
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == before
    assert [p.name for p in repo.parent.iterdir()] == ["repo"]  # no staging folder left behind


def test_served_repository_answers_match_the_folded_models(repo, images, engine):
    """The folded onnxruntime models and the Engine model agree (same logits' argmax)."""
    import onnxruntime as ort

    from rmt_deploy.runtime.preprocess import ImageTransform, to_batch

    batch = to_batch(images[:4], ImageTransform.from_config(engine.bundle.manifest.preprocess))
    for task in engine.tasks:
        session = ort.InferenceSession(str(repo / task / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        logits = session.run(None, {"image": batch})[0]
        np.testing.assert_allclose(logits, engine.predict(batch, task=task).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("field, value, message", [
    ("model_name", "../x", "model name '../x' must be 1-128 letters, digits, '_', '.', '-'"),
    ("top_k", 0, "top-k 0 must be an integer >= 1"),
    ("max_batch", 0, "max batch 0 must be an integer >= 1"),
    ("instances", 0, "instances 0 must be an integer >= 1"),
])
def test_serving_config_names_a_bad_value(field, value, message):
    from dataclasses import replace

    from rmt_deploy.errors import InputError
    from rmt_deploy.serving.triton_repo import ServingConfig

    with pytest.raises(InputError) as caught:
        replace(ServingConfig(), **{field: value}).validate()
    assert str(caught.value) == message
