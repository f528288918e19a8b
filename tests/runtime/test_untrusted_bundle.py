"""Each hole found in 0.1 bundles, closed: confined paths, schema-checked manifests, hashed files,
validated safetensors headers, mask blobs sized by the tensor they mask."""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from rmt_deploy.artifacts.bundle import Bundle, record_files
from rmt_deploy.artifacts.manifest import UnverifiedBundleWarning
from rmt_deploy.errors import ArtifactError, IncompatibleBaseError
from rmt_deploy.runtime.engine import Engine

pytest.importorskip("onnxruntime")


@pytest.fixture
def copy(onnx_bundle, tmp_path):
    """copy(**manifest changes) -> a copy of the bundle (beside an 'outside' folder) with its manifest edited."""
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("x.onnx", "w.safetensors", "evil.rmtask"):
        shutil.copyfile(onnx_bundle.root / "base.onnx", outside / name)

    def make(edit=None):
        root = tmp_path / "bundle"
        if root.exists():
            shutil.rmtree(root)
        shutil.copytree(onnx_bundle.root, root)
        doc = json.loads((root / "manifest.json").read_text())
        if edit is not None:
            edit(doc)
        (root / "manifest.json").write_text(json.dumps(doc))
        return root
    return make


def _error(root, task: str | None = None) -> str:
    """The one-line error of loading the bundle (and of switching to `task`: tasks are read at first use)."""
    with pytest.raises(ArtifactError) as info:
        with Engine.load(root, threads=1) as engine:
            if task is not None:
                engine.switch(task)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("edit, named", [
    (lambda d: d["files"]["onnx"].update(base="../../outside/x.onnx"), "files.onnx.base"),
    (lambda d: d["files"]["onnx"].update(base="/etc/hostname"), "files.onnx.base"),
    (lambda d: d.update(base_weights="../outside/w.safetensors"), "base_weights"),
    (lambda d: d["tasks"].append("../../../outside/evil"), "manifest.tasks[3]"),
    (lambda d: d["files"]["onnx"]["folded"].update(alpha="folded/../../outside/x.onnx"), "folded.alpha"),
])
def test_paths_that_leave_the_bundle_are_refused_naming_the_entry(copy, edit, named):
    message = _error(copy(edit))
    assert named in message and ("leaves the bundle" in message or "task name" in message)


def test_a_symlink_out_of_the_bundle_is_refused(copy, tmp_path):
    root = copy()
    (root / "base.onnx").unlink()
    (root / "base.onnx").symlink_to(tmp_path / "outside" / "x.onnx")
    assert "outside the bundle" in _error(root)


@pytest.mark.parametrize("field, value, expected", [
    ("max_batch", None, "manifest.max_batch is null, expected an integer"),
    ("max_batch", "four", 'manifest.max_batch is "four"'),
    ("files", [], "manifest.files is [], expected a JSON object"),
    ("files", {"onnx": {"base": 5}}, "manifest.files.onnx.base: 5 is not a relative file path"),
    ("image_size", "32", "manifest.preprocess.image_size"),
    ("image_size", [100000, 100000], "manifest.preprocess.image_size[0] is 100000"),
    ("mean", [0.5], "manifest.preprocess.mean"),
    ("std", [0, 0, 0], "manifest.preprocess.std[0] is 0"),
    ("std", [1, 1, float("nan")], "manifest.preprocess.std[2] is NaN"),
    ("version", 4, "written by a newer rmt-deploy"),
    ("fingerprint", "abc", "manifest.fingerprint"),
])
def test_bad_manifest_values_are_one_line_errors_naming_the_field(copy, field, value, expected):
    def edit(doc):
        (doc["preprocess"] if field in doc["preprocess"] else doc)[field] = value
    assert expected in _error(copy(edit))


def test_unknown_keys_are_a_warning_and_the_bundle_still_serves(copy, onnx_bundle, images):
    root = copy(lambda d: d.update(serving_hints={"gpu": "any"}))
    with pytest.warns(UserWarning, match="unknown key.*serving_hints"):
        with Engine.load(root, threads=1) as engine:
            served = engine.predict(images, task="beta").logits
    with Engine.load(onnx_bundle, threads=1) as engine:
        np.testing.assert_array_equal(served, engine.predict(images, task="beta").logits)


def test_a_task_file_listed_under_another_name_is_refused(copy):
    root = copy()
    shutil.copyfile(root / "tasks" / "alpha.rmtask", root / "tasks" / "beta.rmtask")
    doc = json.loads((root / "manifest.json").read_text())
    doc["checksums"] = {k: v.to_json() for k, v in record_files(root).items()}  # consistent hashes
    (root / "manifest.json").write_text(json.dumps(doc))
    assert "holds task 'alpha', but the bundle lists it as 'beta'" in _error(root, "beta")


def test_another_exports_base_graph_is_caught_by_its_hash(copy, onnx_bundle):
    root = copy()
    graph = bytearray((root / "base.onnx").read_bytes())
    graph[-200:] = bytes(200)  # same size, other weights: what a swapped export looks like to the loader
    (root / "base.onnx").write_bytes(bytes(graph))
    assert "base.onnx: sha256" in _error(root)


def test_legacy_bundle_loads_with_a_warning_and_serves_the_same(copy, onnx_bundle, images):
    def to_legacy(doc):
        del doc["checksums"], doc["quick_gelu"]
        doc["version"] = 1
    with pytest.warns(UnverifiedBundleWarning, match="format 1 .*not verified.*rmt-deploy export"):
        with Engine.load(copy(to_legacy), threads=1) as engine:
            served = engine.predict(images, task="gamma").logits
    with Engine.load(onnx_bundle, threads=1) as engine:
        np.testing.assert_array_equal(served, engine.predict(images, task="gamma").logits)


def test_onnxruntime_failures_at_run_time_name_the_bundle_file(onnx_bundle, images, monkeypatch):
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    with Engine.load(onnx_bundle, threads=1) as engine:
        def broken(*args, **kwargs):
            raise Fail("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running MatMul")
        monkeypatch.setattr(engine._backend.session, "run_with_iobinding", broken)  # the CPU run path
        with pytest.raises(ArtifactError, match=r"base\.onnx: ONNX Runtime failed to run it .*inspect"):
            engine.predict(images)


# ---- safetensors headers ----

def _safetensors(header: object, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("content, expected", [
    (_safetensors(b"[" * 100000 + b"]" * 100000), "not valid JSON"),
    (_safetensors([1, 2]), "is a JSON list, not an object"),
    (_safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, bytes(8)), "data_offsets"),
    (_safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, bytes(8)), "offsets span 8"),
    (_safetensors({"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
                   "b": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}}, bytes(8)), "overlap"),
    (_safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(4)), "file holds 4"),
    (_safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(12)), "file holds 12"),
    (_safetensors({"w": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)), "unsupported dtype"),
    (struct.pack("<Q", 1 << 60) + b"{}", "header length"),
])
def test_hostile_safetensors_headers_are_refused(tmp_path, content, expected):
    from rmt_deploy.artifacts.task_file import read_encoded
    from rmt_deploy.runtime.baseweights import SafetensorsReader

    path = tmp_path / "x.rmtask"
    path.write_bytes(content)
    for read in (SafetensorsReader, read_encoded):
        with pytest.raises(ArtifactError, match=expected):
            read(path)


# ---- mask blobs sized by the tensor, not by themselves ----

def test_a_mask_blob_declaring_more_elements_than_its_tensor_is_refused_before_allocating(packs):
    from rmt_deploy.artifacts.masks import _ZEROS, _blob, decode_mask, decode_zero_indices
    from rmt_deploy.runtime.task_reader import read_task

    bomb = _blob(_ZEROS, (1 << 31,), 1 << 31)  # ~20 bytes: "all zeros, 2^31 elements"
    assert len(bomb) < 40
    for decode in (decode_mask, decode_zero_indices):
        with pytest.raises(ArtifactError, match=r"declares shape \[2147483648\], the tensor it masks is \[8, 8\]"):
            decode(bomb, (8, 8))
    with pytest.raises(IncompatibleBaseError, match="has shape"):
        read_task(_task_with_blob(packs["alpha"], bomb, [1 << 31]), packs["alpha"].base_fingerprint,
                  {n: m.shape for n, m in packs["alpha"].masks.items()}, packs["alpha"].head.shape[1])


def _task_with_blob(pack, blob: bytes, shape: list[int]):
    """A task file whose first mask is `blob`, declared with `shape` (consistent checksums)."""
    import tempfile
    from pathlib import Path

    from safetensors.numpy import save

    from rmt_deploy.artifacts import task_file as taskpack

    meta = pack.metadata()
    first = meta["masked_tensors"][0]["name"]
    meta["masked_tensors"][0]["shape"] = shape
    tensors = {taskpack.HEAD_KEY: pack.head}
    for name, keep in pack.masks.items():
        encoded = blob if name == first else taskpack.encode_mask(keep)
        tensors[taskpack.MASK_PREFIX + name] = np.frombuffer(encoded, np.uint8)
    meta_json = json.dumps(meta)
    header = {taskpack.METADATA_KEY: meta_json, taskpack.CHECKSUM_KEY: taskpack._checksum(meta_json, tensors)}
    path = Path(tempfile.mkdtemp()) / "bomb.rmtask"
    path.write_bytes(save(tensors, metadata=header))
    return path


def test_no_allocation_beyond_the_declared_tensors_under_a_2_gib_address_space(packs, tmp_path):
    """In a process limited to 2 GiB of address space, blobs declaring 2^40 and 2^31 elements are
    refused with one-line errors: nothing tries to allocate what they declare."""
    pack = packs["alpha"]
    small = _task_with_blob(pack, _blob_bytes(1 << 31), [1 << 31])
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from rmt_deploy.errors import RmtError
        from rmt_deploy.artifacts.masks import _ZEROS, _blob, decode_mask, decode_zero_indices
        from rmt_deploy.runtime.task_reader import read_task
        from rmt_deploy.artifacts.task_file import TaskPack
        outcomes = []
        def attempt(call):
            try:
                call()
                outcomes.append("accepted")
            except RmtError as exc:
                outcomes.append("error" if "\\n" not in str(exc) else "multi-line")
        for size in (1 << 40, 1 << 31):
            bomb = _blob(_ZEROS, (size,), size)
            attempt(lambda: decode_mask(bomb, (8, 8)))
            attempt(lambda: decode_zero_indices(bomb, (8, 8)))
            attempt(lambda: decode_zero_indices(bomb))
        shapes = {json.dumps({n: list(m.shape) for n, m in pack.masks.items()})}
        attempt(lambda: read_task({str(small)!r}, {pack.base_fingerprint!r},
                                  {{n: tuple(s) for n, s in shapes.items()}}, {pack.head.shape[1]}))
        attempt(lambda: TaskPack.load({str(small)!r}))
        print(outcomes)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == str(["error"] * 8)


def _blob_bytes(size: int) -> bytes:
    from rmt_deploy.artifacts.masks import _ZEROS, _blob

    return _blob(_ZEROS, (size,), size)


def test_inspect_verify_reports_every_damaged_file(copy, capsys):
    from rmt_deploy.cli import main

    root = copy()
    for relative in ("tasks/gamma.rmtask", "folded/beta.onnx"):
        data = bytearray((root / relative).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (root / relative).write_bytes(bytes(data))
    with pytest.raises(SystemExit) as info:
        main(["inspect", str(root), "--verify"])
    captured = capsys.readouterr()
    assert info.value.code == 1
    assert "2 FAILED" in captured.out and "FAILED tasks/gamma.rmtask" in captured.out
    assert captured.err.strip().startswith("error: ") and "2 file(s) failed verification" in captured.err
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        main(["inspect", str(copy()), "--verify", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert doc["verification"]["ok"] and doc["verification"]["files_checked"] == 9
    assert Bundle.open(copy()).verified
