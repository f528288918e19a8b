"""`rmt-deploy demo` command."""
from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the report, data, tasks and bundle (replaced if it holds an earlier demo).")
@click.option("--fast", is_flag=True, help="A tiny run (fewer images and epochs, small model) for tests.")
@click.option("--epochs", type=int, default=None, help="Override the training epochs.")
def demo(out: Path, fast: bool, epochs: int | None) -> None:
    """Train, export, serve and benchmark two real-image tasks on a small random-weight CLIP, offline."""
    from dataclasses import replace

    from rmt_deploy.demo.pipeline import DemoConfig, run_demo
    from rmt_deploy.demo.report import summary_text
    from rmt_deploy.errors import InputError

    config = DemoConfig.fast() if fast else DemoConfig()
    if epochs is not None:
        if epochs < 1:
            raise InputError(f"--epochs {epochs}: train for at least 1 epoch")
        config = replace(config, epochs=epochs)
    report = run_demo(config, out, say=lambda text: click.echo(text, err=True))
    click.echo(summary_text(report))
