"""Operating-system errors end as one line naming the path, and nothing half-written is published:
no space (a 64 KiB tmpfs), file too large (RLIMIT_FSIZE), read-only target (a read-only tmpfs),
permission denied; for `export` (a new --out and --force over a bundle) and `train`."""
from __future__ import annotations

import errno
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TINY_MODEL = "rmt-tiny-vit"


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_mounts = pytest.mark.skipif(not (shutil.which("unshare") and _unshare_works()),
                                  reason="needs `unshare -m` (a private mount namespace) to mount a small tmpfs")


def _cli(args, mount: tuple[Path, str] | None = None, file_limit: int | None = None) -> subprocess.CompletedProcess:
    """`rmt-deploy ARGS` in a subprocess; with `mount` = (folder, options) a fresh tmpfs is mounted on
    folder in a private mount namespace first; with `file_limit`, RLIMIT_FSIZE is set."""
    command = [sys.executable, "-m", "rmt_deploy.cli", *map(str, args)]
    if mount is not None:
        folder, options = mount
        folder.mkdir(parents=True, exist_ok=True)
        command = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o {options} tmpfs "$0" && exec "$@"', str(folder),
                   *command]

    def limit() -> None:
        if file_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return subprocess.run(command, capture_output=True, text=True, preexec_fn=limit, timeout=600)


def _one_line(result: subprocess.CompletedProcess, path: Path, reason: str) -> str:
    """The one error line (progress bars aside): it names `path` and `reason`; no traceback."""
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    assert str(path) in errors[0] and reason in errors[0], errors[0]
    return errors[0]


def _export_args(checkpoint, tasks, out, *extra):
    return ["export", "--model", TINY_MODEL, "--pretrained", checkpoint, *[a for t in tasks for a in ("--task", t)],
            "--out", out, *extra]


@pytest.fixture(scope="module")
def task_files(packs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("os_error_tasks")
    return [pack.save(folder / f"{name}.rmtask") for name, pack in packs.items()]


def test_export_past_a_file_size_limit_is_one_line_and_publishes_nothing(tiny_checkpoint, task_files, tmp_path):
    out = tmp_path / "bundle"
    result = _cli(_export_args(tiny_checkpoint, task_files, out), file_limit=200_000)
    _one_line(result, out, "File too large")
    assert list(tmp_path.iterdir()) == []


def test_export_force_past_a_file_size_limit_keeps_the_old_bundle(tiny_checkpoint, task_files, onnx_bundle, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(onnx_bundle.root, out)
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    result = _cli(_export_args(tiny_checkpoint, task_files[:1], out, "--force"), file_limit=200_000)
    _one_line(result, out, "File too large")
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before


@needs_mounts
@pytest.mark.parametrize("options, reason", [("ro,size=1m", "Read-only file system"),
                                             ("size=64k", "No space left on device")])
def test_export_to_a_read_only_or_full_folder_is_one_line_and_publishes_nothing(tiny_checkpoint, task_files, tmp_path,
                                                                                options, reason):
    out = tmp_path / "mnt" / "bundle"
    result = _cli(_export_args(tiny_checkpoint, task_files, out), mount=(out.parent, options))
    _one_line(result, out, reason)
    assert list((tmp_path / "mnt").iterdir()) == []  # the tmpfs is gone with its namespace; nothing leaked here


@needs_mounts
def test_train_into_a_read_only_out_is_one_line(tiny_checkpoint, coop_root, tmp_path):
    out = tmp_path / "mnt"
    result = _cli(_train_args(tiny_checkpoint, coop_root, out), mount=(out, "ro,size=1m"))
    _one_line(result, out, "Read-only file system")


def test_train_past_a_file_size_limit_is_one_line_and_leaves_no_task_file(tiny_checkpoint, coop_root, tmp_path):
    out = tmp_path / "run"
    result = _cli(_train_args(tiny_checkpoint, coop_root, out), file_limit=2_000)
    _one_line(result, out, "File too large")
    assert not list(out.glob("*.rmtask"))


def test_permission_denied_is_one_line_naming_the_path(monkeypatch, capsys, tmp_path):
    """(As root no permission is ever denied for real: the error is raised where a write would fail.)"""
    from rmt_deploy.cli import main
    from rmt_deploy.tools import bundle_edit

    target = tmp_path / "bundle" / "tasks"

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(target))

    monkeypatch.setattr(bundle_edit, "add_tasks", denied)
    with pytest.raises(SystemExit) as exit_info:
        main(["bundle", "add", str(tmp_path), str(tmp_path / "x.rmtask")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1
    assert err == f"error: {target}: Permission denied; check the permissions or choose another path"


def _train_args(checkpoint, root, out) -> list[str]:
    return ["train", "--model", TINY_MODEL, "--pretrained", str(checkpoint), "--dataset", "dtd", "--data-root",
            str(root), "--out", str(out), "--shots", "2", "--epochs", "1", "--batch-size", "4", "--workers", "0",
            "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def coop_root(tmp_path_factory) -> Path:
    import importlib.util

    spec = importlib.util.spec_from_file_location("training_conftest",
                                                  Path(__file__).parent / "training" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_coop_dataset(tmp_path_factory.mktemp("coop_os"))
