"""The `rmt-deploy` command line: every click command, and the group that loads them lazily.

The top layer: the only one that may import from every other (training, export, runtime,
serving, tools, bench, demo); nothing imports it. One module per command; each imports the
layer it drives only when it runs, so `rmt-deploy predict` never imports torch.
A user error (RmtError) prints as one line on stderr and exits 1; so does an operating-system
error (no space, file too large, read-only filesystem, permission denied, ...), naming the path.
"""
from __future__ import annotations

import errno
import importlib
import importlib.util
import sys
import warnings

import click

from rmt_deploy import __version__
from rmt_deploy.errors import RmtError, missing_dependency

# command name -> "module:attribute" of a click.Command
COMMANDS = {
    "train": "rmt_deploy.cli.train:train",
    "eval": "rmt_deploy.cli.train:evaluate",
    "export": "rmt_deploy.cli.export:export",
    "inspect": "rmt_deploy.cli.inspect:inspect",
    "bundle": "rmt_deploy.cli.bundle:bundle",
    "predict": "rmt_deploy.cli.predict:predict",
    "serve": "rmt_deploy.cli.serve:serve",
    "bench": "rmt_deploy.cli.bench:bench",
    "demo": "rmt_deploy.cli.demo:demo",
}


class LazyGroup(click.Group):
    """A group that imports a command's module only when that command runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name in COMMANDS if self._importable(name))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("rmt_deploy"):
                return None
            raise
        return getattr(module, attribute)

    @staticmethod
    def _importable(name: str) -> bool:
        module_name = COMMANDS[name].split(":")[0]
        return importlib.util.find_spec(module_name) is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rmt-deploy")
def cli() -> None:
    """Train, export and serve Regularized Mask Tuning tasks for open_clip models."""


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001 - warnings API
    return f"warning: {message}\n"


def os_error_line(exc: OSError) -> str:
    """'PATH: reason' (or 'SOURCE -> TARGET: reason') of an OSError, with a hint for the usual causes."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    hint = {errno.ENOSPC: "free some space or choose another folder",
            errno.EDQUOT: "free some space or choose another folder",
            errno.EFBIG: "a file-size limit (ulimit -f) or the filesystem's largest file was reached",
            errno.EROFS: "choose a writable folder", errno.EACCES: "check the permissions or choose another path",
            errno.EPERM: "check the permissions or choose another path"}.get(exc.errno)
    where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
    text = f"{where}: {reason}" if where is not None else reason
    return f"{text}; {hint}" if hint else text


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI, printing user errors and warnings as one line each."""
    warnings.formatwarning = _one_line_warning
    try:
        cli.main(args=argv, prog_name="rmt-deploy", standalone_mode=False)
    except RmtError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except ModuleNotFoundError as exc:  # an optional package a command needs is not installed
        missing = missing_dependency(exc)
        if missing is None:
            raise
        click.echo(f"error: {missing}", err=True)
        sys.exit(1)
    except OSError as exc:  # the environment, not a bug: one line naming the path and the reason
        click.echo(f"error: {os_error_line(exc)}", err=True)
        sys.exit(1)
    except MemoryError:
        click.echo("error: out of memory; a file declared more data than fits (damaged or hostile input?), or "
                   "the batch is too large for this machine", err=True)
        sys.exit(1)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)

