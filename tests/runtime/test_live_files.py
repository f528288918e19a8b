"""A live Engine never dies and never answers differently because a bundle file changed after it loaded.

Every bundle file (base graph, base weights, a task file, a folded model, the manifest, the constant graph
that constant sessions are made from: read again for each) x (truncate,
same-size rewrite, delete, replace with another bundle's): tasks already read answer exactly as
before; a task read after the change answers as before or fails alone with an ArtifactError naming
its file. The engine keeps two buffers for three tasks, so the change is followed by a new buffer
and by in-place rewrites (where a mapped base used to fault with SIGBUS). Tasks removed or added
under a live engine: the error says so and how to reload.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from rmt_deploy.errors import ArtifactError, UnknownTaskError
from rmt_deploy.runtime.engine import Engine
from rmt_deploy.tools.bundle_edit import add_tasks, remove_tasks

pytest.importorskip("onnxruntime")

FILES = {"base graph": "base.onnx", "base weights": "base_weights.safetensors", "task file": "tasks/beta.rmtask",
         "folded model": "folded/beta.onnx", "manifest": "manifest.json", "constant graph": "base_constant.onnx"}
CHANGES = ["truncate", "same-size rewrite", "delete", "replace with another bundle's"]


def change(path, how: str, other_root, relative: str) -> None:
    """Change a file the way an operator or a copy would (in place, as `cp` or `rsync --inplace` do)."""
    if how == "truncate":
        with open(path, "r+b") as handle:
            handle.truncate(path.stat().st_size // 2)
    elif how == "same-size rewrite":
        data = bytearray(path.read_bytes())
        rng = np.random.default_rng(0)
        start = len(data) // 3
        data[start:] = rng.integers(0, 256, len(data) - start, dtype=np.uint8).tobytes()
        with open(path, "r+b") as handle:  # same inode, same size
            handle.write(data)
    elif how == "delete":
        path.unlink()
    else:
        with open(path, "wb") as handle:  # cp over the served file: same inode, the other bundle's bytes
            handle.write((other_root / relative).read_bytes())


@pytest.fixture
def live(onnx_bundle, tmp_path):
    root = tmp_path / "bundle"
    shutil.copytree(onnx_bundle.root, root)
    return root


@pytest.fixture(scope="module")
def answers(onnx_bundle, images):
    with Engine.load(onnx_bundle.root, threads=1) as engine:
        return {task: engine.predict(images, task=task).probs for task in engine.tasks}


@pytest.mark.parametrize("how", CHANGES)
@pytest.mark.parametrize("what", list(FILES))
def test_a_changed_bundle_file_never_kills_or_changes_a_live_engine(live, other_bundle, answers, images, what, how):
    relative = FILES[what]
    with Engine.load(live, task="alpha", cache_tasks=2, threads=1) as engine:
        np.testing.assert_array_equal(engine.predict(images).probs, answers["alpha"])
        change(live / relative, how, other_bundle, relative)
        for _ in range(2):  # beta needs a second buffer, gamma a rewrite, alpha a rewrite back
            for task in ("beta", "gamma", "alpha"):
                try:
                    probs = engine.predict(images, task=task).probs
                except ArtifactError as exc:
                    assert relative == f"tasks/{task}.rmtask", f"{task} failed for a change of {relative}: {exc}"
                    assert str(live / relative) in str(exc)
                    continue
                np.testing.assert_array_equal(probs, answers[task], err_msg=f"{task} after {how} of {relative}")
        if relative == "tasks/beta.rmtask":  # read only after the change: it must have failed, alone
            with pytest.raises(ArtifactError, match="beta.rmtask"):
                engine.predict(images, task="beta")


def test_a_task_file_changed_after_load_is_named_as_such(live, other_bundle, images):
    with Engine.load(live, task="alpha", threads=1) as engine:
        shutil.copyfile(other_bundle / "manifest.json", live / "manifest.json")  # the whole bundle replaced
        for relative in ("tasks/beta.rmtask", "base.onnx", "base_weights.safetensors"):
            shutil.copyfile(other_bundle / relative, live / relative)
        with pytest.raises(ArtifactError, match=r"beta.rmtask: changed after this engine loaded bundle .*load the "
                                                r"bundle again"):
            engine.predict(images, task="beta")
        assert engine.predict(images, task="alpha").probs.shape[0] == len(images)


def test_a_task_removed_under_a_live_engine_says_so_and_how_to_reload(live, images):
    with Engine.load(live, task="alpha", threads=1) as engine:
        remove_tasks(live, ["beta"])
        assert engine.tasks == ["alpha", "beta", "gamma"]  # the tasks as loaded (documented)
        with pytest.raises(UnknownTaskError, match=r"task 'beta' was removed from bundle .* after this engine "
                                                   r"loaded it; load the bundle again \(Engine.load"):
            engine.predict(images, task="beta")
        engine.predict(images, task="gamma")
    with Engine.load(live, threads=1) as reloaded:
        assert reloaded.tasks == ["alpha", "gamma"]


def test_a_task_added_under_a_live_engine_says_so_and_how_to_use_it(live, make_taskpack, tmp_path, images):
    path = make_taskpack("late", seed=12).save(tmp_path / "late.rmtask")
    with Engine.load(live, task="alpha", threads=1) as engine:
        add_tasks(live, [path])
        with pytest.raises(UnknownTaskError, match=r"task 'late' was added to bundle .* after this engine loaded "
                                                   r"it; .*engine.add_task\("):
            engine.predict(images, task="late")
        engine.add_task(live / "tasks" / "late.rmtask")
        assert engine.predict(images, task="late").probs.shape == (len(images), 3)


def test_an_engine_holds_no_bundle_file_open_or_mapped_after_load(live):
    with Engine.load(live, task="alpha", threads=1):
        held = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                if os.path.exists(f"/proc/self/fd/{fd}")]
        maps = open("/proc/self/maps").read()
    assert not [p for p in held if p.startswith(str(live))]
    assert str(live) not in maps
