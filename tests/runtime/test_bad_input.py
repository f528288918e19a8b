"""Every bad input gets one clear RmtError naming the problem and the fix."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from rmt_deploy.cli import main
from rmt_deploy.errors import ArtifactError, IncompatibleBaseError, InputError, MissingDependencyError, UnknownTaskError
from rmt_deploy.runtime.buffer_pool import TensorSpec
from rmt_deploy.runtime.engine import Engine

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def engine(onnx_bundle):
    with Engine.load(onnx_bundle, task="alpha", cache_tasks=1, threads=1) as engine:
        yield engine


@pytest.fixture
def damaged(onnx_bundle, copy_bundle, tmp_path):
    """damaged(relative path, how) -> a copy of the bundle with one file altered."""
    def make(relative: str, how: str):
        root = copy_bundle(onnx_bundle.root, tmp_path)
        path = root / relative
        data = bytearray(path.read_bytes())
        if how == "truncate":
            data = data[: len(data) // 2]
        else:  # flip bytes in the middle
            middle = len(data) // 2
            data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
        path.write_bytes(bytes(data))
        return root
    return make


def test_unknown_task_lists_the_available_ones(onnx_bundle, engine, images):
    with pytest.raises(UnknownTaskError, match=r"'dtdd' not in bundle .*available: alpha, beta, gamma"):
        Engine.load(onnx_bundle, task="dtdd")
    with pytest.raises(UnknownTaskError, match="available: alpha, beta, gamma"):
        engine.predict(images, task="dtdd")
    with pytest.raises(UnknownTaskError, match="available: alpha, beta, gamma"):
        engine.switch("dtdd")
    assert engine.task == "alpha"


@pytest.mark.parametrize("batch, message", [
    (np.zeros((3, 32, 32), np.float32), "expected (N, 3, 32, 32)"),
    (np.zeros((2, 3, 64, 64), np.float32), "expected (N, 3, 32, 32)"),
    (np.zeros((2, 3, 32, 32), np.float64), "dtype is float64"),
    (np.full((2, 3, 32, 32), np.nan, np.float32), "NaN or Inf"),
    (np.full((2, 3, 32, 32), -np.inf, np.float32), "NaN or Inf"),
    (np.zeros((0, 3, 32, 32), np.float32), "empty batch"),
    ([], "empty batch"),
    ([np.zeros((4, 4, 2), np.uint8)], "is not HxW"),
])
def test_bad_batches(engine, batch, message):
    with pytest.raises(InputError) as info:
        engine.predict(batch)
    assert message in str(info.value)


def test_unreadable_image_file_names_it(engine, tmp_path):
    bad = tmp_path / "photo.jpg"
    bad.write_text("not an image")
    with pytest.raises(InputError, match="photo.jpg"):
        engine.predict([bad])
    with pytest.raises(InputError, match="does not exist"):
        engine.predict([tmp_path / "missing.png"])


def test_pack_from_another_base_is_refused(engine, make_taskpack, tmp_path):
    pack = make_taskpack("stranger", seed=5)
    pack.base_fingerprint = "sha256:" + "ab" * 32
    with pytest.raises(IncompatibleBaseError, match="'stranger' was trained on base abababababab"):
        engine.add_task(pack)
    path = pack.save(tmp_path / "stranger.rmtask")
    with pytest.raises(IncompatibleBaseError, match="retrain the task on this base"):
        engine.add_task(path)
    assert "stranger" not in engine.tasks


def test_hot_added_task_serves_and_duplicates_are_refused(engine, make_taskpack, images, reference, tmp_path):
    pack = make_taskpack("delta", seed=11, zeros=0.2)
    assert engine.add_task(pack.save(tmp_path / "delta.rmtask")) == "delta"
    np.testing.assert_allclose(engine.predict(images, task="delta").logits, reference(pack, images),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(InputError, match="already loaded"):
        engine.add_task(pack)


@pytest.mark.parametrize("relative, how", [
    ("base_weights.safetensors", "flip"),
    ("base_weights.safetensors", "truncate"),
    ("base.onnx", "truncate"),
    ("tasks/alpha.rmtask", "flip"),
    ("manifest.json", "truncate"),
])
def test_corrupted_bundle_file_is_an_artifact_error(damaged, relative, how):
    root = damaged(relative, how)
    with pytest.raises(ArtifactError) as info:
        Engine.load(root, threads=1)  # loads (and so reads) the first task, alpha
    message = str(info.value)
    assert "\n" not in message and relative.split("/")[-1] in message or "fingerprint" in message


def test_a_damaged_task_fails_at_its_first_use_and_the_others_keep_serving(damaged, images):
    """Tasks are read lazily: a damaged one does not stop the load, it fails alone, every time it is used."""
    root = damaged("tasks/beta.rmtask", "flip")
    with Engine.load(root, threads=1) as engine:
        assert engine.tier("beta") == "disk"
        for _ in range(2):
            with pytest.raises(ArtifactError, match="beta.rmtask") as info:
                engine.predict(images, task="beta")
            assert "\n" not in str(info.value)
            assert engine.tier("beta") == "disk"
        assert engine.predict(images, task="alpha").task == "alpha"


def test_damaged_base_weights_are_caught_by_their_sha256_whatever_the_backend_layout(damaged):
    """The file hash is checked while the base is read, also for a transposed fp16 (TensorRT-style) layout."""
    from rmt_deploy.artifacts.bundle import Bundle
    from rmt_deploy.runtime.backends.tensorrt import fill_base_all
    from rmt_deploy.runtime.baseweights import SafetensorsReader

    root = damaged("base_weights.safetensors", "flip")
    bundle = Bundle.open(root)
    tensor = bundle.manifest.masked_tensors[0]
    rows, cols = tensor.shape
    spec = TensorSpec("w", (cols, rows), np.dtype(np.float32), tensor.name, perm=(1, 0))
    reader = SafetensorsReader(root / "base_weights.safetensors")
    with pytest.raises(ArtifactError, match=r"base_weights\.safetensors: sha256 .*rebuild the bundle"):
        fill_base_all(reader, [spec], {"w": np.empty(spec.shape, spec.dtype)},
                      bundle.record("base_weights.safetensors"))


def test_legacy_manifest_without_base_sha256_falls_back_to_the_fingerprint(damaged):
    from rmt_deploy.artifacts.manifest import UnverifiedBundleWarning

    root = damaged("base_weights.safetensors", "flip")
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest.pop("base_weights_sha256") and manifest.pop("checksums")
    manifest["version"] = 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UnverifiedBundleWarning), pytest.raises(ArtifactError, match="fingerprint .*rebuild"):
        Engine.load(root, threads=1)


def test_missing_bundle_file_is_an_artifact_error(onnx_bundle, copy_bundle, tmp_path):
    root = copy_bundle(onnx_bundle.root, tmp_path)
    (root / "base_weights.safetensors").unlink()
    with pytest.raises(ArtifactError, match="bundle file missing"):
        Engine.load(root)


def test_backend_not_installed_or_not_available(onnx_bundle, monkeypatch):
    with pytest.raises(MissingDependencyError, match="TensorRT is not installed|cuda-python"):
        Engine.load(onnx_bundle, backend="tensorrt", device="cuda")
    with pytest.raises(MissingDependencyError, match=r"rmt-deploy\[gpu\]"):
        Engine.load(onnx_bundle, backend="onnxruntime", device="cuda")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match=r"rmt-deploy\[onnx\]"):
        Engine.load(onnx_bundle, backend="onnxruntime")


@pytest.mark.parametrize("kwargs, message", [
    ({"backend": "tflite"}, "backend 'tflite' is not one of"),
    ({"device": "gpu"}, "device 'gpu' is not"),
    ({"cache_tasks": 0}, "cache_tasks=0"),
    ({"threads": 0}, "threads=0"),
])
def test_bad_engine_arguments(onnx_bundle, kwargs, message):
    with pytest.raises(InputError, match=message):
        Engine.load(onnx_bundle, **kwargs)


def test_closed_engine_refuses_work(onnx_bundle, images):
    engine = Engine.load(onnx_bundle, threads=1)
    engine.close()
    engine.close()
    with pytest.raises(InputError, match="closed"):
        engine.predict(images)


def test_cli_prints_one_line_errors(onnx_bundle, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--bundle", str(onnx_bundle.root), "--task", "dtdd", str(tmp_path / "x.png")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: task 'dtdd' not in bundle") and "\n" not in err
    with pytest.raises(SystemExit):
        main(["predict", "--bundle", str(onnx_bundle.root), str(tmp_path / "x.png")])
    assert "does not exist" in capsys.readouterr().err


def test_cli_text_and_json_output(onnx_bundle, tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "x.png"
    Image.fromarray(np.full((20, 20, 3), 128, np.uint8)).save(image)
    main(["predict", "--bundle", str(onnx_bundle.root), "--task", "beta", "--top-k", "2", str(image)])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "task beta (onnxruntime-cpu)" and out[1] == str(image) and len(out) == 4
    main(["predict", "--bundle", str(onnx_bundle.root), "--json", str(image), str(image)])
    doc = json.loads(capsys.readouterr().out)
    assert doc["task"] == "alpha" and len(doc["results"]) == 2 and len(doc["results"][0]["top_k"]) == 3
