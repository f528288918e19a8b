"""`rmt-deploy inspect`: summarise a .rmtask file or a bundle directory; --verify re-hashes a bundle."""
from __future__ import annotations

import json
from pathlib import Path

import click

from rmt_deploy.errors import ArtifactError, InputError


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--verify", is_flag=True,
              help="Bundle only: check every file's size and sha256 and read every task; exit 1 on any failure.")
def inspect(path: Path, as_json: bool, verify: bool) -> None:
    """Summarise a .rmtask file or a bundle directory (tasks, base, files; --verify checks all hashes)."""
    if path.is_dir():
        from rmt_deploy.tools.bundle_summary import format_bundle, summarize_bundle

        summary = summarize_bundle(path, verify=verify)
        click.echo(json.dumps(summary, indent=2) if as_json else format_bundle(summary))
        failures = summary.get("verification", {}).get("failures", {})
        if failures:
            first = next(iter(failures.items()))
            raise ArtifactError(f"{path}: {len(failures)} file(s) failed verification; first: {first[1]}")
        return
    if verify:
        raise InputError("--verify checks a bundle directory; a .rmtask file is always checked when read")
    from rmt_deploy.tools.task_summary import format_task, summarize

    summary = summarize(path)
    click.echo(json.dumps(summary, indent=2) if as_json else format_task(summary))
