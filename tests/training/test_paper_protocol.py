"""benchmarks/paper: the resumable plan on a tiny model and fake CoOp layouts, its tables, JSON and plot."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from .conftest import write_coop_dataset  # noqa: E402
from .test_data import _write_imagenet_family  # noqa: E402

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


def _args(checkpoint, root, out, *extra):
    return ["--data-root", str(root), "--out", str(out), "--model", "rmt-tiny-vit", "--pretrained", str(checkpoint),
            "--epochs", "1", "--lr", "2e-3", "--batch-size", "4", "--device", "cpu", "--workers", "0", *extra]


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper-data")
    write_coop_dataset(root)  # dtd
    write_coop_dataset(root, counts=(3, 1, 2), classes=("AnnualCrop", "Forest", "SeaLake"), folder="eurosat",
                       image_dir="2750", split_file="split_zhou_EuroSAT.json")
    return root


def test_sweep_is_interrupted_resumed_and_tabulated(tiny_checkpoint, two_datasets, tmp_path, monkeypatch, capsys):
    run = _load("run")
    args = _args(tiny_checkpoint, two_datasets, tmp_path, "--protocols", "few_shot", "--datasets", "dtd", "eurosat",
                 "--shots", "1", "2", "--seeds", "1", "2")
    real_train, calls = run.train_task, []

    def train_then_die(cfg, base=None):
        if len(calls) == 3:
            raise KeyboardInterrupt  # the job is killed while the fourth cell starts
        calls.append(cfg.out)
        return real_train(cfg, base=base)

    monkeypatch.setattr(run, "train_task", train_then_die)
    with pytest.raises(KeyboardInterrupt):
        run.main(args)
    assert not (tmp_path / "table.md").exists()
    monkeypatch.setattr(run, "train_task", real_train)
    capsys.readouterr()
    assert run.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("done, skipped") == 3 and out.count(": finished") == 5

    summary = json.loads((tmp_path / "summary.json").read_text())
    table = (tmp_path / "table.md").read_text()
    for shots in ("1", "2"):
        row = summary["few_shot"][shots]["datasets"]["eurosat"]
        seeds = [json.loads((tmp_path / "few_shot" / "eurosat" / f"shots{shots}" / f"seed{s}" / "metrics.json")
                            .read_text()) for s in (1, 2)]
        assert row["rmt"]["seeds"] == 2
        assert row["rmt"]["mean"] == pytest.approx(50 * (seeds[0]["test_accuracy"] + seeds[1]["test_accuracy"]))
        assert row["zero_shot_paper"] == 47.60 and row["rmt_paper"] is None  # per-dataset paper figures: 16 shots
        assert f"| EuroSAT | 2 | {row['zero_shot']['mean']:.2f} | 47.60 | {row['rmt']['mean']:.2f}" in table
    assert "## Few-shot, 1 shots" in table and "| average (2 datasets) |" in table
    assert (tmp_path / "shots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert run.main(args) == 0 and capsys.readouterr().out.count("done, skipped") == 8


def test_the_default_plan_is_the_papers_whole_protocol(tmp_path, capsys):
    run = _load("run")
    assert run.main(["--data-root", str(tmp_path), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    few, b2n, dg, both = (sum(line.startswith(p) for line in lines)
                          for p in ("few_shot", "base_to_new", "domain", "combined"))
    assert (few, b2n, dg, both) == (5 * 3 * 11, 5 * 3 * 11, 3 * 4, 2 * 3 * 11)
    assert all(line.endswith("to run") for line in lines)
    assert "domain imagenet -> imagenet_r 16-shot seed 3: to run" in lines
    assert "combined coop + dtd 16-shot seed 1: to run" in lines
    assert "combined tip-adapter + ucf101 16-shot seed 3: to run" in lines


def test_combined_cells_train_each_head_and_tabulate_beside_the_published_average(tiny_checkpoint, two_datasets,
                                                                                    tmp_path):
    run = _load("run")
    args = _args(tiny_checkpoint, two_datasets, tmp_path, "--protocols", "few_shot", "combined", "--datasets", "dtd",
                 "--shots", "1", "--combined-shots", "1", "--seeds", "1")
    assert run.main(args) == 0
    for head in ("coop", "tip-adapter"):
        metrics = json.loads((tmp_path / "combined" / head / "dtd" / "shots1" / "seed1" / "metrics.json").read_text())
        assert metrics["head"] == head
    summary = json.loads((tmp_path / "summary.json").read_text())["combined"]
    row = summary["tip-adapter"]["datasets"]["dtd"]
    assert row["combined"]["seeds"] == 1 and row["rmt"]["seeds"] == 1
    assert row["method_paper"] is None  # published per-dataset columns are 16-shot figures
    assert summary["coop"]["average"]["combined_paper"] is None  # one dataset: not comparable to the 11-dataset 83.16
    text = (tmp_path / "table.md").read_text()
    assert "## R-AMT + coop head" in text and "## R-AMT + tip-adapter head" in text


def test_published_combined_averages_are_the_papers():
    published = _load("published")
    assert published.PUBLISHED_COMBINED_AVERAGE == {"coop": 83.16, "tip-adapter": 84.37}
    rows = published.PUBLISHED_16_SHOT.values()
    for head, average in (("coop", 79.90), ("tip-adapter", 81.24)):
        column = published.METHOD_ALONE_COLUMN[head]
        assert sum(r[column] for r in rows) / 11 == pytest.approx(average, abs=0.01)


def test_base_to_new_trains_on_base_and_scores_new_with_a_text_head(tiny_checkpoint, tmp_path, capsys):
    run = _load("run")
    write_coop_dataset(tmp_path / "data", counts=(2, 1, 2), classes=("a_1", "b_2", "c_3", "d_4"))
    args = _args(tiny_checkpoint, tmp_path / "data", tmp_path / "out", "--protocols", "base_to_new",
                 "--datasets", "dtd", "--shots", "1", "--seeds", "1")
    assert run.main(args) == 0
    cell = tmp_path / "out" / "base_to_new" / "dtd" / "shots1" / "seed1"
    from rmt_deploy.artifacts.task_file import TaskPack

    assert TaskPack.load(cell / "dtd.rmtask").class_names == ["a 1", "b 2"]
    new = json.loads((cell / "new.json").read_text())
    assert new["total"] == 4 and 0.0 <= new["zero_shot_accuracy"] <= 1.0
    row = json.loads((tmp_path / "out" / "summary.json").read_text())["base_to_new"]["1"]["dtd"]
    base = 100 * json.loads((cell / "metrics.json").read_text())["test_accuracy"]
    assert row["base"]["mean"] == pytest.approx(base) and row["new"]["mean"] == pytest.approx(100 * new["accuracy"])
    if base + row["new"]["mean"]:
        assert row["hm"] == pytest.approx(2 * base * row["new"]["mean"] / (base + row["new"]["mean"]))
    assert "## Base-to-new, 1 shots" in (tmp_path / "out" / "table.md").read_text()


def test_domain_generalisation_evaluates_the_imagenet_task_on_its_variants(tiny_checkpoint, tmp_path):
    run = _load("run")
    _write_imagenet_family(tmp_path / "data")
    args = _args(tiny_checkpoint, tmp_path / "data", tmp_path / "out", "--protocols", "domain", "--seeds", "1",
                 "--domain-shots", "1", "--domain-variants", "imagenetv2", "imagenet_a")
    assert run.main(args) == 0
    result = json.loads((tmp_path / "out" / "domain" / "imagenet_a" / "seed1.json").read_text())
    assert result["dataset"] == "imagenet_a" and result["total"] == 4
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())["domain"]
    assert set(rows) == {"imagenet", "imagenetv2", "imagenet_a"} and rows["imagenet_a"]["rmt"]["seeds"] == 1
    assert (tmp_path / "out" / "few_shot" / "imagenet" / "shots1" / "seed1" / "imagenet.rmtask").is_file()


@pytest.mark.slow
def test_torchrun_two_processes_write_one_table(tiny_checkpoint, two_datasets, tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch was built without the gloo backend")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(PAPER.parents[1]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(PAPER / "run.py"), *_args(tiny_checkpoint, two_datasets, tmp_path, "--protocols", "few_shot",
                                             "base_to_new", "--datasets", "dtd", "--shots", "1", "--seeds", "1")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("# R-AMT reproduction") == 1 and done.stdout.count("dtd 1-shot seed 1: running") == 2
    metrics = json.loads((tmp_path / "few_shot" / "dtd" / "shots1" / "seed1" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert (tmp_path / "base_to_new" / "dtd" / "shots1" / "seed1" / "new.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["shots.png", "summary.json", "table.md"]


def test_published_table_matches_the_reference():
    published = _load("published")
    rows = published.PUBLISHED_16_SHOT
    assert len(rows) == 11
    for column, average in zip((1, 4), (65.23, 83.96)):
        assert sum(r[column] for r in rows.values()) / 11 == pytest.approx(average, abs=0.01)
