"""TaskPack: round trip, validation, corruption, base checks, atomic writes."""
from __future__ import annotations

import json

import numpy as np
import pytest

from rmt_deploy.artifacts.task_file import TaskPack, read_encoded
from rmt_deploy.errors import ArtifactError, IncompatibleBaseError, InputError


def _pack(name: str = "dtd", seed: int = 0) -> TaskPack:
    rng = np.random.default_rng(seed)
    masks = {
        "visual.transformer.resblocks.0.attn.in_proj_weight": rng.random((48, 16)) > 0.05,
        "visual.transformer.resblocks.0.attn.out_proj.weight": rng.random((16, 16)) > 0.1,
    }
    return TaskPack(
        name=name,
        class_names=["banded", "blotchy", "braided"],
        head=rng.standard_normal((3, 8)).astype(np.float32),
        masks=masks,
        base_fingerprint="sha256:" + "ab" * 32,
        model_name="rmt-tiny-vit",
        logit_scale=100.0,
        template="{} texture.",
        metrics={"test_accuracy": 0.75},
        hyperparameters={"lr": 8e-5, "epochs": 30},
    )


def test_round_trip_preserves_every_field(tmp_path):
    pack = _pack()
    path = pack.save(tmp_path / "dtd.rmtask")
    loaded = TaskPack.load(path)
    assert loaded.name == pack.name and loaded.class_names == pack.class_names
    assert loaded.model_name == pack.model_name and loaded.base_fingerprint == pack.base_fingerprint
    assert loaded.template == pack.template and loaded.logit_scale == pack.logit_scale
    assert loaded.metrics == pack.metrics and loaded.hyperparameters == pack.hyperparameters
    np.testing.assert_array_equal(loaded.head, pack.head)
    assert loaded.masks.keys() == pack.masks.keys()
    for name, keep in pack.masks.items():
        assert loaded.masks[name].dtype == np.bool_
        np.testing.assert_array_equal(loaded.masks[name], keep)
    assert loaded.sparsity == pytest.approx(pack.sparsity)


def test_mask_blobs_are_readable_without_decoding(tmp_path):
    from rmt_deploy.artifacts.masks import decode_mask

    pack = _pack()
    path = pack.save(tmp_path / "dtd.rmtask")
    blobs = read_encoded(path).blobs
    for name, keep in pack.masks.items():
        np.testing.assert_array_equal(decode_mask(blobs[name]), keep)


def test_save_leaves_no_temp_files(tmp_path):
    _pack().save(tmp_path / "dtd.rmtask")
    assert [p.name for p in tmp_path.iterdir()] == ["dtd.rmtask"]


def test_save_into_missing_folder_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        _pack().save(tmp_path / "nope" / "dtd.rmtask")


def test_check_base_refuses_another_fingerprint():
    pack = _pack()
    pack.check_base(pack.base_fingerprint)
    with pytest.raises(IncompatibleBaseError, match="retrain"):
        pack.check_base("sha256:" + "cd" * 32)


@pytest.mark.parametrize("name", ["", "a/b", "../x", " dtd", "x" * 200])
def test_bad_task_names_are_refused(name):
    with pytest.raises(InputError, match="task name"):
        _pack(name=name)


def test_head_rows_must_match_class_count():
    pack = _pack()
    with pytest.raises(InputError, match="class names"):
        TaskPack(pack.name, pack.class_names[:2], pack.head, pack.masks, pack.base_fingerprint, pack.model_name)


def test_truncated_file_raises_artifact_error_at_every_offset(tmp_path):
    data = _pack().save(tmp_path / "good.rmtask").read_bytes()
    bad = tmp_path / "bad.rmtask"
    for cut in range(0, len(data), max(1, len(data) // 97)):
        bad.write_bytes(data[:cut])
        with pytest.raises(ArtifactError, match="bad.rmtask"):
            TaskPack.load(bad)


def test_flipped_bytes_raise_artifact_error(tmp_path):
    data = bytearray(_pack().save(tmp_path / "good.rmtask").read_bytes())
    bad = tmp_path / "bad.rmtask"
    rng = np.random.default_rng(1)
    for offset in sorted(set(rng.integers(0, len(data), 150).tolist()) | {0, 8, len(data) - 1}):
        altered = bytearray(data)
        altered[offset] ^= 0x5A
        bad.write_bytes(bytes(altered))
        with pytest.raises(ArtifactError):
            TaskPack.load(bad)


def _rewrite_metadata(path, out, change):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from rmt_deploy.artifacts.task_file import CHECKSUM_KEY, METADATA_KEY, _checksum

    with safe_open(str(path), framework="numpy") as handle:
        meta = json.loads(handle.metadata()[METADATA_KEY])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    change(meta)
    meta_json = json.dumps(meta)
    save_file(tensors, str(out), metadata={METADATA_KEY: meta_json, CHECKSUM_KEY: _checksum(meta_json, tensors)})


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(format="something-else"), "format tag"),
        (lambda m: m.update(version=99), "version"),
        (lambda m: m.pop("class_names"), "malformed"),
        (lambda m: m["masked_tensors"][0].update(shape=[3, 3]), "shape"),
    ],
)
def test_wrong_header_is_refused(tmp_path, change, message):
    good = _pack().save(tmp_path / "good.rmtask")
    _rewrite_metadata(good, tmp_path / "bad.rmtask", change)
    with pytest.raises(ArtifactError, match=message):
        TaskPack.load(tmp_path / "bad.rmtask")


def test_plain_safetensors_file_is_not_a_task(tmp_path):
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(3, np.float32)}, str(tmp_path / "x.rmtask"))
    with pytest.raises(ArtifactError, match="not an rmt-deploy task file"):
        TaskPack.load(tmp_path / "x.rmtask")


def test_missing_file_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="no such task file"):
        TaskPack.load(tmp_path / "missing.rmtask")


def test_saved_file_gets_the_usual_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        path = _pack().save(tmp_path / "dtd.rmtask")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644
