"""benchmarks/paper runs unchanged on a tiny model and renders its table beside the published numbers."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

PAPER = Path(__file__).resolve().parents[2] / "benchmarks" / "paper"


def _load(name):
    sys.path.insert(0, str(PAPER))
    try:
        spec = importlib.util.spec_from_file_location(f"paper_{name}", PAPER / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(PAPER))


def test_paper_sweep_trains_skips_and_tabulates(tiny_checkpoint, coop_root, tmp_path, capsys):
    run = _load("run")
    args = ["--data-root", str(coop_root), "--out", str(tmp_path), "--datasets", "dtd", "--seeds", "1",
            "--model", "rmt-tiny-vit", "--pretrained", str(tiny_checkpoint), "--shots", "16", "--epochs", "1",
            "--lr", "2e-3", "--batch-size", "4", "--device", "cpu", "--workers", "0"]
    with pytest.raises(Exception, match="fewer than --shots 16"):
        run.main(args)
    args[args.index("--shots") + 1] = "4"
    assert run.main(args) == 0
    metrics = json.loads((tmp_path / "dtd" / "seed1" / "metrics.json").read_text())
    table = (tmp_path / "table.md").read_text()
    assert f"| DTD | 1 | {100 * metrics['zero_shot_test_accuracy']:.2f} | 44.39 |" in table
    assert f"| {100 * metrics['test_accuracy']:.2f} | 74.57 |" in table
    capsys.readouterr()
    assert run.main(args) == 0  # a finished run is skipped
    assert "dtd seed 1: done, skipped" in capsys.readouterr().out


def test_published_table_matches_the_reference():
    published = _load("published")
    rows = published.PUBLISHED_16_SHOT
    assert len(rows) == 11
    for column, average in zip((1, 4), (65.23, 83.96)):
        assert sum(r[column] for r in rows.values()) / 11 == pytest.approx(average, abs=0.01)
