"""`rmt-deploy serve --engine ray` refusing a bad bundle in one line. The running server (answers, top-k,
SIGTERM, exit 0, its "serving" / "stopped" lines) is test_ray_same_client.py's ray case."""
from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install 'rmt-deploy[ray]')")

CLI = [sys.executable, "-c", "from rmt_deploy.cli import main; main()"]


def test_a_bad_bundle_is_one_line_and_exit_1(tmp_path):
    result = subprocess.run([*CLI, "serve", "--engine", "ray", "--bundle", str(tmp_path / "nope")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "nope" in result.stderr
