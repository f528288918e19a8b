"""`rmt-deploy bench`: measure a bundle, print a table, write JSON and a plot."""
from __future__ import annotations

import json
import os
from pathlib import Path

import click

from rmt_deploy.artifacts.staging import write_atomic
from rmt_deploy.bench.suite import BenchConfig, run_bench
from rmt_deploy.errors import InputError


def _int_list(value: str) -> list[int]:
    try:
        sizes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--batch-sizes {value!r} is not a comma-separated list of integers, e.g. 1,8,32") from None
    if not sizes or min(sizes) < 1:
        raise InputError(f"--batch-sizes {value!r} must list positive integers, e.g. 1,8,32")
    return sizes


def _save_plot(results: dict, path: Path) -> None:
    from rmt_deploy.bench.report import plot

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    try:
        plot(results, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@click.command()
@click.option("--bundle", required=True, type=click.Path(path_type=Path), help="Bundle directory from `rmt-deploy export`.")
@click.option("--backend", default="auto", show_default=True, help="auto, onnxruntime, tensorrt or torch.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--batch-sizes", default="1,8,32", show_default=True, help="Comma-separated batch sizes.")
@click.option("--tasks", default=None, help="Comma-separated tasks to measure (default: all).")
@click.option("--repeats", default=20, show_default=True, type=int, help="Timed runs per variant and batch size.")
@click.option("--threads", default=None, type=int, help="Intra-op threads (default: the runtime's choice).")
@click.option("--no-memory", is_flag=True, help="Skip the peak-RSS measurements (two extra processes).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write results as JSON.")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False, path_type=Path), help="Write a PNG plot.")
def bench(bundle: Path, backend: str, device: str, batch_sizes: str, tasks: str | None, repeats: int,
          threads: int | None, no_memory: bool, json_out: Path | None, plot_out: Path | None) -> None:
    """Latency, throughput, load, switch, memory and disk figures of a bundle, measured interleaved."""
    from rmt_deploy.bench.report import format_table

    for out in (json_out, plot_out):
        if out is not None and not out.parent.is_dir():
            raise InputError(f"output folder {out.parent} does not exist: create it first")
    task_list = [t for t in tasks.split(",") if t] if tasks else None
    config = BenchConfig(bundle, backend, device, _int_list(batch_sizes), task_list, repeats, threads,
                         memory=not no_memory)
    results = run_bench(config)
    click.echo(format_table(results))
    if json_out is not None:
        write_atomic(json_out, json.dumps(results, indent=2).encode())
        click.echo(f"wrote {json_out}")
    if plot_out is not None:
        _save_plot(results, plot_out)
        click.echo(f"wrote {plot_out}")
