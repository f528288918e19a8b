"""The CLI group, `inspect`, and one-line user errors."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from rmt_deploy import __version__
from rmt_deploy.artifacts.task_file import TaskPack
from rmt_deploy.cli import main


def _run(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def _small_pack(tmp_path):
    rng = np.random.default_rng(0)
    pack = TaskPack(
        name="eurosat",
        class_names=["forest", "river"],
        head=rng.standard_normal((2, 4)).astype(np.float32),
        masks={"visual.transformer.resblocks.0.attn.out_proj.weight": rng.random((64, 64)) > 0.025},
        base_fingerprint="sha256:" + "0f" * 32,
        model_name="rmt-tiny-vit",
        metrics={"test_accuracy": 0.9},
    )
    return pack, pack.save(tmp_path / "eurosat.rmtask")


def test_version(capsys):
    main(["--version"])
    assert __version__ in capsys.readouterr().out


def test_inspect_json_summarises_the_pack(tmp_path, capsys):
    pack, path = _small_pack(tmp_path)
    main(["inspect", str(path), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["task"] == "eurosat" and summary["classes"] == ["forest", "river"]
    assert summary["masked_weights"] == 64 * 64
    assert summary["sparsity"] == pytest.approx(pack.sparsity)
    assert summary["packbits_bytes"] == 512
    assert 0 < summary["entropy_bound_bytes"] <= summary["stored_bytes"] < summary["packbits_bytes"] + 64
    assert summary["metrics"] == {"test_accuracy": 0.9}


def test_inspect_table(tmp_path, capsys):
    _, path = _small_pack(tmp_path)
    main(["inspect", str(path)])
    out = capsys.readouterr().out
    assert "eurosat" in out and "forest, river" in out and "resblocks.0.attn.out_proj.weight" in out


def test_corrupt_file_is_one_line_and_exit_1(tmp_path, capsys):
    bad = tmp_path / "bad.rmtask"
    bad.write_bytes(b"not a task file")
    code, out, err = _run(["inspect", str(bad)], capsys)
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1 and "bad.rmtask" in err
    assert "Traceback" not in err


def test_console_script_prints_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "rmt_deploy.cli", "inspect", str(tmp_path / "missing.rmtask")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert "no such task file" in result.stderr and "Traceback" not in result.stderr


def test_unknown_command_is_a_usage_error(capsys):
    code, _, err = _run(["frobnicate"], capsys)
    assert code == 2 and "No such command" in err


@pytest.mark.parametrize("command", [
    ["train", "--model", "rmt-tiny-vit", "--dataset", "dtd", "--data-root", ".", "--out", "out"],
    ["eval", "--task", "a.rmtask", "--dataset", "dtd", "--data-root", "."],
    ["demo", "--fast"],
])
def test_command_without_its_extra_names_the_extra(tmp_path, command):
    code = (
        "import sys\n"
        "for name in ('torch', 'torchvision', 'open_clip'):\n"
        "    sys.modules[name] = None\n"
        "from rmt_deploy.cli import main\n"
        f"main({command!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("pip install 'rmt-deploy[train]'")
