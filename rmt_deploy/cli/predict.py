"""`rmt-deploy predict`: classify image files with one task of a bundle (no torch needed)."""
from __future__ import annotations

import json

import click

from rmt_deploy.runtime.backends import BACKENDS


@click.command("predict")
@click.option("--bundle", "bundle", required=True, type=click.Path(file_okay=False),
              help="Bundle directory written by `rmt-deploy export`.")
@click.option("--task", default=None, help="Task to use (default: the bundle's first task).")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--top-k", "top_k", default=5, show_default=True, type=click.IntRange(min=1),
              help="How many classes to print per image.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(BACKENDS),
              help="Runtime backend.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="Intra-op threads (default: all cores).")
def predict(bundle: str, task: str | None, images: tuple[str, ...], top_k: int, as_json: bool,
            backend: str, device: str, threads: int | None) -> None:
    """Classify IMAGE files with one task of a bundle."""
    from rmt_deploy.runtime.engine import Engine

    with Engine.load(bundle, task=task, backend=backend, device=device, cache_tasks=1, threads=threads) as engine:
        prediction = engine.predict(list(images))
        ranked = prediction.top_k(top_k)
        if as_json:
            results = [{"image": image, "label": label, "index": int(index),
                        "top_k": [{"label": name, "prob": prob} for name, prob in top]}
                       for image, label, index, top in zip(images, prediction.labels, prediction.indices, ranked)]
            click.echo(json.dumps({"task": prediction.task, "backend": engine.backend, "results": results},
                                  indent=2))
            return
        click.echo(f"task {prediction.task} ({engine.backend})")
        for image, top in zip(images, ranked):
            click.echo(image)
            for name, prob in top:
                click.echo(f"  {prob:7.2%}  {name}")
