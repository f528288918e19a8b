"""`rmt-deploy bundle add|remove`: bundle maintenance without a re-export, all or nothing."""
from __future__ import annotations

import numpy as np
import pytest

from rmt_deploy.artifacts.bundle import Bundle
from rmt_deploy.cli import main
from rmt_deploy.errors import ArtifactError, IncompatibleBaseError, InputError, UnknownTaskError
from rmt_deploy.runtime.engine import Engine
from rmt_deploy.tools.bundle_edit import _edit_lock, add_tasks, remove_tasks

pytest.importorskip("onnxruntime")


@pytest.fixture
def root(onnx_bundle, copy_bundle, tmp_path):
    return copy_bundle(onnx_bundle.root, tmp_path)


def _snapshot(root):
    """Every file under the bundle (hidden ones too) with its bytes, the lock file aside."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _verified(root) -> Bundle:
    bundle = Bundle.open(root)
    assert [error for _, error in bundle.verify() if error] == []
    return bundle


def test_added_tasks_are_listed_verified_and_served(root, make_taskpack, tmp_path, images, packs):
    new = [make_taskpack(f"new{i}", seed=40 + i, zeros=0.2) for i in range(2)]
    paths = [p.save(tmp_path / f"{p.name}.rmtask") for p in new]
    assert add_tasks(root, paths) == ["new0", "new1"]
    bundle = _verified(root)
    assert bundle.tasks == ["alpha", "beta", "gamma", "new0", "new1"]
    with Engine.load(root, threads=1) as engine, Engine.load(root, threads=1) as reference:
        for pack in new:
            served = engine.predict(images, task=pack.name).logits
            with Engine.load(root, task=pack.name, threads=1, cache_tasks=1) as fresh:
                np.testing.assert_array_equal(served, fresh.predict(images).logits)
            assert served.shape == (len(images), len(pack.class_names))
        np.testing.assert_array_equal(engine.predict(images, task="alpha").logits,
                                      reference.predict(images, task="alpha").logits)


@pytest.mark.parametrize("problem", ["other base", "duplicate", "damaged", "twice", "other activation"])
def test_a_bad_task_changes_nothing(root, make_taskpack, tmp_path, packs, problem):
    good = make_taskpack("fine", seed=7).save(tmp_path / "fine.rmtask")
    bad = make_taskpack("bad", seed=8)
    if problem == "other base":
        bad.base_fingerprint = "sha256:" + "ab" * 32
    if problem == "other activation":
        bad.quick_gelu = True
    path = (packs["beta"] if problem == "duplicate" else bad).save(tmp_path / "bad.rmtask")
    if problem == "damaged":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    sources = [good, good] if problem == "twice" else [good, path]
    before = _snapshot(root)
    expected = {"other base": IncompatibleBaseError, "duplicate": InputError, "damaged": ArtifactError,
                "twice": InputError, "other activation": IncompatibleBaseError}[problem]
    with pytest.raises(expected) as info:
        add_tasks(root, sources)
    message = str(info.value)
    assert "\n" not in message and ("bad.rmtask" in message or "fine.rmtask" in message)
    assert _snapshot(root) == before  # no task file, no temporary file, the same manifest


def test_a_crash_before_the_manifest_is_written_leaves_the_old_bundle(root, make_taskpack, tmp_path, monkeypatch):
    path = make_taskpack("late", seed=9).save(tmp_path / "late.rmtask")
    before = _snapshot(root)

    def crash(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Bundle, "write_manifest", crash)
    with pytest.raises(OSError):
        add_tasks(root, [path])
    assert _snapshot(root) == before


def test_removed_tasks_leave_the_manifest_and_the_disk(root, images):
    assert (root / "folded" / "beta.onnx").exists()
    assert remove_tasks(root, ["beta"]) == ["beta"]
    bundle = _verified(root)
    assert bundle.tasks == ["alpha", "gamma"] and "beta" not in bundle.manifest.files["onnx"]["folded"]
    assert not (root / "tasks" / "beta.rmtask").exists() and not (root / "folded" / "beta.onnx").exists()
    with Engine.load(root, threads=1) as engine:
        assert engine.tasks == ["alpha", "gamma"]
        with pytest.raises(UnknownTaskError, match="available: alpha, gamma"):
            engine.predict(images, task="beta")
    before = _snapshot(root)
    with pytest.raises(UnknownTaskError, match="'nope' not in bundle .*available: alpha, gamma"):
        remove_tasks(root, ["alpha", "nope"])
    assert _snapshot(root) == before


def test_one_editor_at_a_time(root, make_taskpack, tmp_path):
    path = make_taskpack("late", seed=9).save(tmp_path / "late.rmtask")
    with _edit_lock(root):
        with pytest.raises(InputError, match=r"another writer holds this bundle's lock \(pid \d+: "):
            add_tasks(root, [path], wait=0)
    assert add_tasks(root, [path]) == ["late"]


def test_cli_add_and_remove(root, make_taskpack, tmp_path, capsys):
    path = make_taskpack("cli", seed=3).save(tmp_path / "cli.rmtask")
    main(["bundle", "add", str(root), str(path)])
    assert "added 1 task(s)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["bundle", "add", str(root), str(path)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and "\n" not in err and "already has a task 'cli'" in err
    main(["bundle", "remove", str(root), "cli", "alpha"])
    assert "removed 2 task(s)" in capsys.readouterr().out
    assert Bundle.open(root).tasks == ["beta", "gamma"]
