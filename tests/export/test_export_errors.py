"""What export refuses, how it fails, and that a failed or killed export leaves no bundle."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from rmt_deploy.errors import ArtifactError, IncompatibleBaseError, InputError

TINY_MODEL = "rmt-tiny-vit"


def _config(checkpoint, tasks, out, **kwargs):
    from rmt_deploy.export import ExportConfig

    return ExportConfig(TINY_MODEL, str(checkpoint), list(tasks), out, **kwargs)


def _cli(argv, capsys):
    from rmt_deploy.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["export", *map(str, argv)])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def _leftovers(folder, name):
    return [p.name for p in folder.iterdir() if p.name.startswith(f".{name}.")]


def test_a_task_from_another_base_is_refused_naming_both_fingerprints(make_taskpack, tiny_checkpoint, tmp_path):
    from rmt_deploy.artifacts.fingerprint import short
    from rmt_deploy.export import export_bundle

    pack = make_taskpack("other")
    real = pack.base_fingerprint
    pack.base_fingerprint = "sha256:" + "ab" * 32
    path = pack.save(tmp_path / "other.rmtask")
    with pytest.raises(IncompatibleBaseError) as error:
        export_bundle(_config(tiny_checkpoint, [path], tmp_path / "out"), progress=False)
    assert short(real) in str(error.value) and "abababababab" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_without_force_and_replaced_with_it(task_files, tiny_checkpoint, tmp_path,
                                                                       capsys):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    (out / "old-file").write_text("old")
    args = ["--model", TINY_MODEL, "--pretrained", tiny_checkpoint, "--task", task_files[0], "--out", out,
            "--quiet", "--no-verify"]
    code, _, err = _cli(args, capsys)
    assert code == 1 and "--force" in err and len(err.strip().splitlines()) == 1
    assert (out / "old-file").is_file()

    from rmt_deploy.cli import main

    main(["export", *map(str, args), "--force"])  # succeeds: returns normally
    table = capsys.readouterr().out
    assert "base.onnx" in table and "alpha" in table and "folded/shared" in table
    assert not (out / "old-file").exists() and (out / "tasks" / "alpha.rmtask").is_file()
    assert _leftovers(tmp_path, "bundle") == []


def test_force_does_not_replace_a_folder_that_is_not_a_bundle(task_files, tiny_checkpoint, tmp_path):
    from rmt_deploy.export import export_bundle

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(InputError, match="not an rmt-deploy bundle"):
        export_bundle(_config(tiny_checkpoint, task_files, folder, force=True), progress=False)
    assert (folder / "holiday.jpg").is_file()


def test_failure_midway_leaves_no_bundle_and_keeps_the_old_one(task_files, tiny_checkpoint, tmp_path,
                                                               monkeypatch):
    from rmt_deploy.export import export_bundle, pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C after base.onnx was written

    monkeypatch.setattr(pipeline, "_write_folded", interrupted)
    out = tmp_path / "bundle"
    with pytest.raises(KeyboardInterrupt):
        export_bundle(_config(tiny_checkpoint, task_files, out, mode="both"), progress=False)
    assert not out.exists() and _leftovers(tmp_path, "bundle") == []

    out.mkdir()
    (out / "manifest.json").write_text('{"old": true}')
    with pytest.raises(KeyboardInterrupt):
        export_bundle(_config(tiny_checkpoint, task_files, out, mode="both", force=True), progress=False)
    assert (out / "manifest.json").read_text() == '{"old": true}'


def test_verification_above_tolerance_fails_with_artifact_error(task_files, tiny_checkpoint, tmp_path,
                                                                monkeypatch):
    from rmt_deploy.export import export_bundle, verify

    monkeypatch.setattr(verify, "FP32_TOLERANCE", 0.0)
    out = tmp_path / "bundle"
    with pytest.raises(ArtifactError, match="does not match the torch model: alpha shared rel L2"):
        export_bundle(_config(tiny_checkpoint, task_files[:1], out), progress=False)
    assert not out.exists()


def test_killed_export_leaves_no_bundle(task_files, tiny_checkpoint, tmp_path):
    out = tmp_path / "bundle"
    code = textwrap.dedent(f"""
        from rmt_deploy.export import ExportConfig, export_bundle
        export_bundle(ExportConfig({TINY_MODEL!r}, {str(tiny_checkpoint)!r}, {[str(p) for p in task_files]!r},
                                   {str(out)!r}, mode="both"), progress=False)
    """)
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not _leftovers(tmp_path, "bundle") and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not out.exists()
    assert _leftovers(tmp_path, "bundle"), "the killed export's staging directory should still be there"

    from rmt_deploy.artifacts.staging import remove_stale as _remove_stale

    _remove_stale(out)  # the next export to this path clears what a dead process left
    assert _leftovers(tmp_path, "bundle") == []


@pytest.mark.parametrize("problem", ["missing task", "corrupt task", "unknown model"])
def test_bad_inputs_give_one_clear_line(problem, task_files, tiny_checkpoint, tmp_path, capsys):
    task, model = task_files[0], TINY_MODEL
    if problem == "missing task":
        task = tmp_path / "nope.rmtask"
    elif problem == "corrupt task":
        task = tmp_path / "corrupt.rmtask"
        task.write_bytes(task_files[0].read_bytes()[:-40])
    else:
        model = "ViT-Nope-99"
    out = tmp_path / "bundle"
    code, _, err = _cli(["--model", model, "--pretrained", tiny_checkpoint, "--task", task, "--out", out,
                         "--quiet"], capsys)
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1, err
    expected = {"missing task": "nope.rmtask: no such task file", "corrupt task": "corrupt.rmtask",
                "unknown model": "'ViT-Nope-99' is unknown"}[problem]
    assert expected in lines[0] and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_a_published_bundle_has_the_modes_the_umask_gives(task_files, tiny_checkpoint, tmp_path, umask):
    """The staging folder is made 0700 and safetensors writes 0600: what lands must be readable as the
    user's umask says (a server running as another user reads the bundle)."""
    from rmt_deploy.export import export_bundle

    out = tmp_path / "bundle"
    previous = os.umask(umask)
    try:
        export_bundle(_config(tiny_checkpoint, task_files[:1], out, verify=False), progress=False)
    finally:
        os.umask(previous)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    want = {path: (0o777 if (tmp_path / path).is_dir() else 0o666) & ~umask for path in modes}
    assert modes == want and "bundle/base_weights.safetensors" in modes
