"""`rmt-deploy demo --fast`: the whole pipeline end to end, and its bad input."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("skimage")
pytest.importorskip("sklearn")

from rmt_deploy.cli import main  # noqa: E402


def test_fast_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    main(["demo", "--fast", "--out", str(out)])
    summary = capsys.readouterr().out
    assert "RANDOM weights" in summary and "--pretrained openai" in summary
    assert "textures" in summary and "digits" in summary and "task switch (p50)" in summary
    report = json.loads((out / "report.json").read_text())
    for task, classes in (("textures", 3), ("digits", 10)):
        metrics = report["training"][task]
        assert metrics["classes"] == classes and 0.0 <= metrics["test_accuracy"] <= 1.0
        served = report["serving"][task]
        assert served["images"] == classes * 6 == metrics["test_images"]
        # the engine serves the same test images the trainer evaluated: same accuracy (one near-tie allowed)
        assert abs(served["accuracy"] - metrics["test_accuracy"]) <= 1.01 / served["images"]
        assert (out / "bundle" / "tasks" / f"{task}.rmtask").is_file()
        assert (out / "bundle" / "folded" / f"{task}.onnx").is_file()
    assert all(check["passed"] for check in report["export"]["checks"])
    for name in ("report.md", "report.png", "bench.png"):
        assert (out / name).stat().st_size > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".demo")]  # no staging left
    manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    assert manifest["pretrained"] == str((out / report["checkpoint"]).resolve())
    from rmt_deploy.runtime.engine import Engine

    with Engine.load(out / "bundle", task="textures", backend="torch") as engine:  # rebuilds from the checkpoint
        assert engine.predict(sorted((out / "data" / "textures" / "test" / "brick").glob("*.png"))).labels


def test_demo_refuses_a_folder_that_is_not_a_demo(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--fast", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "is not a demo folder" in err and "Traceback" not in err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_demo_rejects_zero_epochs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--fast", "--epochs", "0", "--out", str(tmp_path / "d")])
    assert exit_info.value.code == 1 and "--epochs 0" in capsys.readouterr().err
