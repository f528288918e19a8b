"""Crash safety of every bundle writer, tested the way SQLite is: kill the writer right after each of
its filesystem mutations in turn, then check that the path holds the old or the new bundle, that it
verifies and serves, and that the next writer leaves nothing behind; and two writers at once."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rmt_deploy.artifacts.bundle import MANIFEST, Bundle
from rmt_deploy.artifacts.staging import remove_stale
from rmt_deploy.runtime.engine import Engine

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

CHILD = Path(__file__).with_name("crash_child.py")
OLD = {"alpha", "beta", "gamma"}


class Zygote:
    """tests/tools/crash_child.py: forks `rmt-deploy` runs with the export stack imported once."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, str(CHILD)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)

    def _ask(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def start(self, args: list[str], log: Path, out: Path, crash_at: int = 0, hold_at: int = 0,
              hold_dir: Path | None = None) -> int:
        run = {"log": str(log), "out": str(out), "crash_at": crash_at, "hold_at": hold_at,
               "hold_dir": str(hold_dir or ""), "args": [str(a) for a in args]}
        return self._ask({"run": run})["pid"]

    def wait(self, pid: int) -> int:
        return self._ask({"wait": pid})["status"]

    def run(self, args: list[str], log: Path, out: Path, crash_at: int = 0) -> int:
        return self.wait(self.start(args, log, out, crash_at))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(30)


@pytest.fixture(scope="module")
def zygote():
    started = Zygote()
    try:
        yield started
    finally:
        started.close()


@pytest.fixture(scope="module")
def inputs(packs, make_taskpack, tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("crash_inputs")
    return {"alpha": packs["alpha"].save(folder / "alpha.rmtask"),
            "delta": make_taskpack("delta", seed=4, zeros=0.1).save(folder / "delta.rmtask"),
            "checkpoint": tiny_checkpoint}


def _commands(inputs, out: Path) -> dict[str, tuple[list[str], set[str]]]:
    """name -> (CLI args, the task set after it)."""
    return {
        "export --force": (["export", "--model", "rmt-tiny-vit", "--pretrained", inputs["checkpoint"], "--task",
                            inputs["alpha"], "--task", inputs["delta"], "--out", out, "--force"], {"alpha", "delta"}),
        "bundle add": (["bundle", "add", out, inputs["delta"]], OLD | {"delta"}),
        "bundle remove": (["bundle", "remove", out, "beta"], OLD - {"beta"}),
    }


def _fresh(onnx_bundle, folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copytree(onnx_bundle.root, folder / "bundle")
    return folder / "bundle"


def _mutations(log: Path, work: Path) -> list[str]:
    """The logged mutations that touch the work folder (not temporary files elsewhere)."""
    return [line for line in log.read_text().splitlines() if str(work) in line]


def _leftovers(work: Path, out: Path) -> list[str]:
    """Anything beside the bundle, and files in it its manifest does not list."""
    beside = [p.name for p in work.iterdir() if p != out]
    listed = set(Bundle.open(out).manifest.checksums) | {MANIFEST}
    inside = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    return beside + [name for name in inside if name not in listed]


def _check_bundle(out: Path, images, allowed: list[set[str]]) -> set[str]:
    bundle = Bundle.open(out)
    assert set(bundle.tasks) in allowed
    assert [error for _, error in bundle.verify() if error] == []
    with Engine.load(out, threads=1, cache_tasks=1) as engine:
        for task in bundle.tasks:
            assert engine.predict(images, task=task).probs.shape[0] == len(images)
    return set(bundle.tasks)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bundle add", "bundle remove", "export --force"])
def test_a_writer_killed_after_any_mutation_leaves_the_old_or_the_new_bundle(name, zygote, inputs, onnx_bundle,
                                                                             tmp_path, images):
    work = tmp_path / "work"
    out = _fresh(onnx_bundle, work)
    args, new = _commands(inputs, out)[name]
    assert zygote.run(args, tmp_path / "count.log", tmp_path / "count.out") == 0, (tmp_path / "count.out").read_text()
    mutations = _mutations(tmp_path / "count.log", work)
    assert mutations, "the writer made no mutation the harness saw"
    seen = set()
    for line in mutations:
        number = int(line.split()[0])
        out = _fresh(onnx_bundle, work)
        log = tmp_path / f"kill-{number}.log"
        status = zygote.run(args, log, tmp_path / f"kill-{number}.out", crash_at=number)
        assert status == 77, f"not killed at {line}: {(tmp_path / f'kill-{number}.out').read_text()[-2000:]}"
        seen.add(frozenset(_check_bundle(out, images, [OLD, new])))
        if name == "export --force":
            remove_stale(out)  # what the next writer does first (the full rerun is checked once below)
        else:  # the next run of the same command: it cleans up, then succeeds or refuses a repeat
            assert zygote.run(args, tmp_path / "next.log", tmp_path / "next.out") in (0, 1)
            assert _check_bundle(out, images, [new]) == new
        assert _leftovers(work, out) == [], f"after a kill at {line}"
    assert seen == {frozenset(OLD), frozenset(new)}  # some kills fall before the commit point, some after
    if name == "export --force":
        assert zygote.run(args, tmp_path / "rerun.log", tmp_path / "rerun.out") == 0
        assert _check_bundle(out, images, [new]) == new and _leftovers(work, out) == []


@pytest.mark.slow
def test_export_force_waits_for_a_bundle_add_held_before_each_of_its_mutations(zygote, inputs, onnx_bundle, tmp_path,
                                                                                images):
    work = tmp_path / "work"
    out = _fresh(onnx_bundle, work)
    commands = _commands(inputs, out)
    add, export = commands["bundle add"][0], commands["export --force"]
    assert zygote.run(add, tmp_path / "count.log", tmp_path / "count.out") == 0
    count = len(_mutations(tmp_path / "count.log", work))
    for number in range(1, count + 1):
        out = _fresh(onnx_bundle, work)
        hold = tmp_path / f"hold-{number}"
        hold.mkdir()
        adding = zygote.start(add, tmp_path / "add.log", tmp_path / f"add-{number}.out", hold_at=number, hold_dir=hold)
        _wait_for(lambda: (hold / "held").exists(), what=f"bundle add to reach mutation {number}")
        exporting = zygote.start(export[0], tmp_path / "export.log", tmp_path / f"export-{number}.out")
        _wait_for(lambda: "waiting for" in _text(tmp_path / f"export-{number}.out"),
                  what="export --force to wait for the lock")
        (hold / "go").touch()
        assert zygote.wait(adding) == 0, (tmp_path / f"add-{number}.out").read_text()
        assert zygote.wait(exporting) == 0, (tmp_path / f"export-{number}.out").read_text()
        assert _check_bundle(out, images, [export[1]]) == export[1]
        assert _leftovers(work, out) == []


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _wait_for(condition, what: str, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_second_writer_fails_in_one_line_naming_the_holder(onnx_bundle, tmp_path):
    from rmt_deploy.artifacts.writer_lock import writer_lock

    out = _fresh(onnx_bundle, tmp_path / "work")
    with writer_lock(out):
        env = {**os.environ, "RMT_DEPLOY_LOCK_WAIT": "0.2"}
        result = subprocess.run([sys.executable, "-m", "rmt_deploy.cli", "bundle", "remove", str(out), "beta"],
                                capture_output=True, text=True, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and lines[-1].startswith(f"error: {out}: another writer holds this bundle's lock "
                                                           f"(pid {os.getpid()}: ")
    assert Bundle.open(out).tasks == ["alpha", "beta", "gamma"]
