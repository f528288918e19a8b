"""`rmt-deploy bundle add|remove`: edit a bundle's tasks in place (no torch, no re-export)."""
from __future__ import annotations

import click


@click.group("bundle")
def bundle() -> None:
    """Add tasks to a bundle or remove them, without a re-export."""


@bundle.command("add")
@click.argument("bundle_dir", metavar="BUNDLE", type=click.Path(file_okay=False))
@click.argument("tasks", metavar="TASK.rmtask...", nargs=-1, required=True, type=click.Path(dir_okay=False))
def add(bundle_dir: str, tasks: tuple[str, ...]) -> None:
    """Copy task files into BUNDLE (each checked against its base first) and list them."""
    from rmt_deploy.tools.bundle_edit import add_tasks

    names = add_tasks(bundle_dir, list(tasks))
    click.echo(f"added {len(names)} task(s) to {bundle_dir}: {', '.join(names)}")


@bundle.command("remove")
@click.argument("bundle_dir", metavar="BUNDLE", type=click.Path(file_okay=False))
@click.argument("names", metavar="NAME...", nargs=-1, required=True)
def remove(bundle_dir: str, names: tuple[str, ...]) -> None:
    """Unlist tasks from BUNDLE and delete their files."""
    from rmt_deploy.tools.bundle_edit import remove_tasks

    removed = remove_tasks(bundle_dir, list(names))
    click.echo(f"removed {len(removed)} task(s) from {bundle_dir}: {', '.join(removed)}")
