"""`rmt-deploy bench`: JSON valid against its schema, a real PNG, bad input as one line."""
from __future__ import annotations

import json
from importlib import resources

import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("onnxruntime")

from rmt_deploy.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    """The shared + folded bundle of alpha and beta that the export tests check (read only here)."""
    return bundle_dir


def _schema():
    return json.loads(resources.files("rmt_deploy.bench").joinpath("schema.json").read_text())


def test_bench_writes_schema_valid_json_and_png(bundle, tmp_path, capsys):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    main(["bench", "--bundle", str(bundle), "--batch-sizes", "1,2", "--repeats", "3",
          "--json", str(out_json), "--plot", str(out_png)])
    table = capsys.readouterr().out
    results = json.loads(out_json.read_text())
    jsonschema.validate(results, _schema())
    variants = {(r["variant"], r["batch"]) for r in results["latency"]}
    names = ("shared:alpha", "shared:beta", "folded:alpha", "folded:beta", "base")
    expected = {(v, b) for b in (1, 2) for v in names}
    assert variants == expected
    assert {"cached_ms", "uncached_ms", "naive_ms"} <= set(results["switch"])
    assert results["memory"]["shared_cache1_mb"] > 0 and results["memory"]["folded_one_session_mb"] > 0
    assert results["disk"]["tasks"]["alpha"]["folded_bytes"] > results["disk"]["tasks"]["alpha"]["rmtask_bytes"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 5000
    assert "shared:alpha" in table and "switch (p50 ms)" in table
    # timed in steady state: each resident task with its constant session
    assert results["sessions"]["on"] and results["sessions"]["ready"] == 2
    assert "constant sessions: 2 ready" in table


def test_schema_rejects_a_result_without_latency(bundle, tmp_path):
    out_json = tmp_path / "bench.json"
    main(["bench", "--bundle", str(bundle), "--batch-sizes", "1", "--repeats", "1", "--no-memory",
          "--json", str(out_json)])
    results = json.loads(out_json.read_text())
    jsonschema.validate(results, _schema())
    del results["latency"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(results, _schema())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-sizes", "1,x"], "--batch-sizes '1,x'"),
        (["--batch-sizes", "0"], "positive integers"),
        (["--tasks", "alphaa"], "task 'alphaa' not in bundle"),
        (["--repeats", "0"], "repeats 0"),
        (["--json", "/nonexistent-folder/x.json"], "does not exist"),
    ],
)
def test_bad_input_is_one_line(bundle, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--bundle", str(bundle), "--no-memory", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert message in err and err.startswith("error: ") and "Traceback" not in err


def test_missing_bundle_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--bundle", str(tmp_path / "nope")])
    assert exit_info.value.code == 1 and "no such bundle directory" in capsys.readouterr().err


def test_peak_rss_of_a_child_does_not_inherit_the_parents_peak():
    import subprocess
    import sys

    import numpy as np

    ballast = np.ones(250_000_000 // 8)  # the parent touches 250 MB
    child = subprocess.run([sys.executable, "-c", "from rmt_deploy.bench.memory import peak_rss_mb; print(peak_rss_mb())"],
                           capture_output=True, text=True, timeout=120)
    assert ballast.sum() > 0 and child.returncode == 0, child.stderr
    assert 5 < float(child.stdout) < 200
