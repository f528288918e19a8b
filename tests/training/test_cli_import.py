"""Listing or routing to the training commands stays cheap: no torch until a command runs."""
from __future__ import annotations

import subprocess
import sys


def test_importing_training_cli_does_not_import_torch():
    code = "import sys, rmt_deploy.training, rmt_deploy.cli.train; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_train_help_lists_the_reference_options():
    from click.testing import CliRunner

    from rmt_deploy.cli import cli

    result = CliRunner().invoke(cli, ["train", "--help"])
    assert result.exit_code == 0
    for option in ("--epochs", "--lr", "--batch-size", "--gdr-lambda", "--no-gdr", "--mask-groups", "--device",
                   "--workers", "--resume", "--shots", "--seed", "--pretrained", "--data-root", "--out"):
        assert option in result.output
