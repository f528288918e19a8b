"""The GPU check kit (benchmarks/gpu, docs/gpu.md) in dry-run form: every check is wired, is attempted,
and says why it skipped; the CPU parts (tiny model) run. Plus the kit's pure parts: the bf16 judge,
the JUnit reader and the wheel picker."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KIT = REPO / "benchmarks" / "gpu"
sys.path.insert(0, str(KIT))

from gpukit import CHECKS  # noqa: E402
from gpukit.suite import gpu_test_files, parse_junit  # noqa: E402
from gpukit.train import judge_curves  # noqa: E402

pytest.importorskip("torch")
pytest.importorskip("open_clip")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """run.sh --dry-run with this interpreter; results in a temp $OUT."""
    out = tmp_path_factory.mktemp("gpu-out")
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    done = subprocess.run(["bash", str(KIT / "run.sh"), "--dry-run", "--work", str(out.parent / "gpu-work")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    return out, done


def test_dry_run_records_every_check_with_a_reason(dry_run):
    out, done = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["dry_run"] and results["finished"]
    assert set(results["checks"]) == set(CHECKS)
    for name in CHECKS:
        check = results["checks"][name]
        assert check["status"] == "skipped", (name, check)
        assert check["reason"].startswith("skipped: "), (name, check["reason"])
        part = check["figures"]["cpu_part"]
        assert part["status"] in ("pass", "skipped") and part["reason"], (name, part)
    assert results["machine"]["status"] == "pass" and results["machine"]["reason"]
    summary = (out / "summary.txt").read_text()
    assert all(name in summary for name in CHECKS)
    assert (out / "machine.txt").is_file() and (out / "checks.log").is_file()
    # what $OUT may hold for the device tool to bring it back: at most 8 plain files, no folders
    assert len(list(out.iterdir())) <= 8 and all(p.is_file() for p in out.iterdir())


def test_dry_run_cpu_parts_ran_the_measuring_code(dry_run):
    checks = json.loads((dry_run[0] / "results.json").read_text())["checks"]
    assert checks["cuda_tests"]["figures"]["cpu_part"]["figures"]["collected"] >= 1
    train = checks["train_step"]["figures"]["cpu_part"]["figures"]
    assert len(train["fp32"]["loss"]) == len(train["bf16"]["loss"]) == train["steps"]
    for name in ("torch_switch", "ort_cuda"):
        part = checks[name]["figures"]["cpu_part"]
        assert part["status"] == "pass", part["reason"]
        assert part["figures"]["uncached_switch_ms"] > 0 and "batch_1" in part["figures"]["predict"]


def test_judge_curves():
    flat = [10.0] * 5
    assert judge_curves(flat, [10.1] * 5, [0.0] * 5)[0]
    ok, why, _ = judge_curves(flat, [10.5] * 5, [0.0] * 5)  # same masks, 5% apart
    assert not ok and "same masks" in why
    falling = [10.0, 10.0, 6.0, 3.0, 1.0]
    sparsity = [0.0, 0.0, 0.3, 0.4, 0.4]
    assert judge_curves(falling, [10.05, 10.05, 6.8, 3.5, 1.2], sparsity, 0.97)[0]  # a flip a little apart
    assert not judge_curves(falling, [10.05, 10.05, 9.0, 3.5, 1.2], sparsity, 0.97)[0]  # 30% of the start
    assert not judge_curves(falling, [10.05, 10.05, 6.5, 3.5, 1.2], sparsity, 0.5)[0]   # masks disagree
    assert not judge_curves(flat, [float("nan")] * 5)[0]


def test_parse_junit(tmp_path):
    path = tmp_path / "j.xml"
    path.write_text('<testsuites><testsuite><testcase classname="a" name="t1" time="0.5"/>'
                    '<testcase classname="a" name="t2"><skipped message="no TensorRT"/></testcase>'
                    '<testcase classname="a" name="t3"><failure message="boom">trace</failure></testcase>'
                    "</testsuite></testsuites>")
    report = parse_junit(path)
    assert report["counts"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1}
    assert [t["message"] for t in report["tests"]] == ["", "no TensorRT", "boom"]


def test_suite_selection_holds_the_gpu_test_files():
    files = gpu_test_files(REPO)
    assert "tests/runtime/test_gpu.py" in files and "tests/export/test_tensorrt.py" in files


def test_wheel_picker_installs_only_what_is_missing(tmp_path):
    for name in ("pytest-1.0-py3-none-any.whl", "no_such_package_rmt-1.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    done = subprocess.run([sys.executable, str(KIT / "pick_wheels.py"), str(tmp_path)], capture_output=True,
                          text=True, check=True)
    picked = {Path(line).name for line in done.stdout.split()}
    assert "no_such_package_rmt-1.0-py3-none-any.whl" in picked
    assert "pytest-1.0-py3-none-any.whl" not in picked  # installed here, and no minimum: kept
