"""Seeded mutation fuzzing of a bundle: every mutation ends in the original predictions or one RmtError line.

Manifest mutations (field deleted, wrong type, out of range, path traversal, absolute path,
symlink out of the bundle, renamed task, unknown key) and byte mutations (flip, truncate,
extend) of base.onnx, base_weights.safetensors, a .rmtask and a folded model. Every file
opened from Python is watched with an audit hook: nothing outside the bundle copy is read.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from rmt_deploy.artifacts.bundle import Bundle
from rmt_deploy.bench.sessions import folded_session
from rmt_deploy.cli import main
from rmt_deploy.errors import RmtError
from rmt_deploy.runtime.engine import Engine

pytest.importorskip("onnxruntime")

MANIFEST_MUTATIONS = 320
BYTE_MUTATIONS = 320
BYTE_TARGETS = ("base.onnx", "base_weights.safetensors", "tasks/beta.rmtask", "folded/gamma.onnx")
HOSTILE_VALUES = [None, "four", 5, -1, 0, 2 ** 40, 1e308, float("nan"), float("inf"), True, [], {}, "",
                  [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]], "x" * 5000, [0.5], [0, 0, 0],
                  [100000, 100000]]
TRAVERSALS = ["../outside/base.onnx", "/etc/hostname", "tasks/../../outside/evil.rmtask", "./base.onnx",
              "link_out/base.onnx", "..", "tasks//beta.rmtask", "C:\\x.onnx"]


class ReadWatch:
    """Records every path opened from Python under `watched` that is not inside `allowed`."""

    def __init__(self, watched: Path):
        self.watched = str(watched.resolve())
        self.allowed = ""
        self.escapes: list[str] = []
        sys.addaudithook(self)

    def __call__(self, event: str, args: tuple) -> None:
        if event != "open" or not self.allowed or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path = os.path.realpath(os.fsdecode(args[0]))
        if path.startswith(self.watched) and not path.startswith(self.allowed):
            self.escapes.append(path)


@pytest.fixture(scope="module")
def reference(onnx_bundle, images):
    """Logits of every task from the shared engine and from each folded model of the intact bundle."""
    with Engine.load(onnx_bundle, threads=1, cache_tasks=1) as engine:
        shared = {t: engine.predict(images, task=t).logits for t in engine.tasks}
    folded = {t: _folded_logits(onnx_bundle, t, images) for t in onnx_bundle.manifest.files["onnx"]["folded"]}
    return shared, folded


def _folded_logits(bundle: Bundle, task: str, images: np.ndarray) -> np.ndarray:
    return folded_session(bundle, task, threads=1).run(["logits"], {"image": images})[0]


@pytest.fixture(scope="module")
def arena(tmp_path_factory):
    """A folder holding the mutated bundle copy and, beside it, an 'outside' folder with bait files."""
    root = tmp_path_factory.mktemp("fuzz")
    outside = root / "outside"
    outside.mkdir()
    for name in ("base.onnx", "evil.rmtask", "w.safetensors", "x.onnx"):
        (outside / name).write_bytes(b"outside the bundle")
    return root


def _close(actual: np.ndarray, expected: np.ndarray) -> bool:
    return actual.shape == expected.shape and np.allclose(actual, expected, rtol=1e-5, atol=1e-5)


def _outcome(root: Path, reference, images) -> str:
    """'original' (every task and folded model predicts as before) or 'error' (an RmtError); else fails."""
    shared, folded = reference
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Engine.load(root, threads=1, cache_tasks=1) as engine:
                for task, expected in shared.items():
                    if not _close(engine.predict(images, task=task).logits, expected):
                        return f"WRONG shared predictions for {task}"
            bundle = Bundle.open(root)
            for task, expected in folded.items():
                if not _close(_folded_logits(bundle, task, images), expected):
                    return f"WRONG folded predictions for {task}"
    except RmtError as exc:
        message = str(exc)
        return "error" if message and "\n" not in message else f"MULTI-LINE error {message!r}"
    return "original"


def _run(root: Path, reference, images, watch: ReadWatch) -> str:
    watch.allowed = str(root.resolve())
    signal.alarm(60)  # a hang fails the test instead of stalling it
    try:
        return _outcome(root, reference, images)
    except Exception as exc:  # noqa: BLE001 - counted: the bar is zero of these
        return f"TRACEBACK {type(exc).__name__}: {str(exc)[:200]}"
    finally:
        signal.alarm(0)
        watch.allowed = ""


def _fresh_copy(source: Path, arena: Path, index: int) -> Path:
    root = arena / f"b{index}"
    shutil.copytree(source, root)
    os.symlink(arena / "outside", root / "link_out")
    return root


# ---- manifest mutations ----

def _paths(node, prefix=()):
    """Every (path, value) in a JSON tree, inner nodes included."""
    yield prefix, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, prefix + (index,))


def _parent(doc, path):
    for key in path[:-1]:
        doc = doc[key]
    return doc


def _mutate_manifest(doc: dict, rng: np.random.Generator) -> tuple[str, dict]:
    doc = copy.deepcopy(doc)
    kind = str(rng.choice(["delete", "wrong type", "out of range", "traversal", "rename task", "unknown key"],
                          p=[0.2, 0.25, 0.15, 0.2, 0.1, 0.1]))
    nodes = [p for p, _ in _paths(doc) if p]
    if kind == "traversal":
        targets = [p for p, v in _paths(doc) if p and p[0] != "pretrained" and isinstance(v, str) and  # a
                   ("/" in v or v.endswith((".onnx", ".safetensors", ".rmtask")))]  # user's checkpoint path
        keys = [("checksums", k) for k in doc["checksums"]]
        choice = int(rng.integers(len(targets) + len(keys)))
        bad = TRAVERSALS[int(rng.integers(len(TRAVERSALS)))]
        if choice < len(targets):
            path = targets[choice]
            _parent(doc, path)[path[-1]] = bad
        else:  # a checksums key pointed elsewhere
            doc["checksums"][bad] = doc["checksums"].pop(keys[choice - len(targets)][1])
        return kind, doc
    if kind == "rename task":
        where = rng.choice(["tasks", "folded", "checksums"])
        new = rng.choice(["alpha2", "ALPHA", "beta", "../alpha", "al pha"])
        if where == "tasks":
            doc["tasks"][int(rng.integers(len(doc["tasks"])))] = str(new)
        elif where == "folded":
            folded = doc["files"]["onnx"]["folded"]
            folded[str(new)] = folded.pop(sorted(folded)[int(rng.integers(len(folded)))])
        else:
            doc["checksums"][f"tasks/{new}.rmtask"] = doc["checksums"].pop("tasks/alpha.rmtask")
        return kind, doc
    if kind == "unknown key":
        _parent_dict = rng.choice([0, 1])
        target = doc if _parent_dict == 0 else doc["preprocess"]
        target[f"future_field_{int(rng.integers(1000))}"] = {"any": [1, 2]}
        return kind, doc
    path = nodes[int(rng.integers(len(nodes)))]
    parent = _parent(doc, path)
    if kind == "delete":
        del parent[path[-1]]
    elif kind == "wrong type":
        parent[path[-1]] = copy.deepcopy(HOSTILE_VALUES[int(rng.integers(len(HOSTILE_VALUES)))])
    else:
        value = parent[path[-1]]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            parent[path[-1]] = [-1, 0, 2 ** 31, 1e9][int(rng.integers(4))]
        else:
            parent[path[-1]] = [-value - 1, 0, value * 10 ** 6, float("inf"), float("nan")][int(rng.integers(5))]
    return str(kind), doc


def test_manifest_mutations_end_in_the_original_predictions_or_one_error_line(onnx_bundle, reference, images,
                                                                                 arena):
    rng = np.random.default_rng(2026)
    watch = ReadWatch(arena)
    intact = json.loads((onnx_bundle.root / "manifest.json").read_text())
    counts: Counter = Counter()
    bad = []
    root = _fresh_copy(onnx_bundle.root, arena, 0)
    for index in range(MANIFEST_MUTATIONS):
        kind, doc = _mutate_manifest(intact, rng)
        (root / "manifest.json").write_text(json.dumps(doc))
        result = _run(root, reference, images, watch)
        counts[(kind, result if result in ("original", "error") else "BAD")] += 1
        if result not in ("original", "error"):
            bad.append((kind, result))
    print("manifest mutations:", dict(sorted(counts.items())))
    assert not bad, bad[:5]
    assert not watch.escapes, watch.escapes[:5]
    assert sum(counts.values()) >= 300
    assert counts[("unknown key", "original")] > 0  # unknown keys are only warned about
    assert counts[("traversal", "error")] > 0 and counts[("traversal", "original")] == 0


# ---- byte mutations ----

def _mutate_bytes(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    kind = str(rng.choice(["flip", "truncate", "extend"]))
    if kind == "truncate":
        return kind, data[:int(rng.integers(len(data)))]
    if kind == "extend":
        return kind, data + rng.bytes(int(rng.integers(1, 64)))
    buffer = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        position = int(rng.integers(len(buffer)))
        buffer[position] ^= int(rng.integers(1, 256))
    return kind, bytes(buffer)


def test_byte_mutations_end_in_the_original_predictions_or_one_error_line(onnx_bundle, reference, images, arena):
    rng = np.random.default_rng(7)
    watch = ReadWatch(arena)
    root = _fresh_copy(onnx_bundle.root, arena, 1)
    originals = {name: (onnx_bundle.root / name).read_bytes() for name in BYTE_TARGETS}
    counts: Counter = Counter()
    bad = []
    for index in range(BYTE_MUTATIONS):
        target = BYTE_TARGETS[index % len(BYTE_TARGETS)]
        kind, data = _mutate_bytes(originals[target], rng)
        (root / target).write_bytes(data)
        result = _run(root, reference, images, watch)
        (root / target).write_bytes(originals[target])
        counts[(target, kind, result if result in ("original", "error") else "BAD")] += 1
        if result not in ("original", "error"):
            bad.append((target, kind, result))
    print("byte mutations:", dict(sorted(counts.items())))
    assert not bad, bad[:5]
    assert not watch.escapes
    assert sum(counts.values()) >= 300


def test_cli_reports_a_mutated_bundle_in_one_line(onnx_bundle, arena, tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "x.png"
    Image.fromarray(np.full((20, 20, 3), 99, np.uint8)).save(image)
    root = _fresh_copy(onnx_bundle.root, arena, 2)
    doc = json.loads((root / "manifest.json").read_text())
    cases = [("files", {"onnx": {"base": "../outside/base.onnx"}}), ("max_batch", "four"),
             ("preprocess", {**doc["preprocess"], "std": [0, 0, 0]})]
    for key, value in cases:
        (root / "manifest.json").write_text(json.dumps({**doc, key: value}))
        for argv in (["predict", "--bundle", str(root), str(image)], ["inspect", str(root), "--verify"]):
            with pytest.raises(SystemExit) as info:
                main(argv)
            err = capsys.readouterr().err.strip().splitlines()
            assert info.value.code == 1 and len(err) == 1 and err[0].startswith("error: ") and key in err[0], err
