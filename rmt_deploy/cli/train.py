"""`rmt-deploy train` and `rmt-deploy eval`: click commands over the trainer and TaskPack evaluation.

torch is imported only when a command runs, so listing commands stays cheap.
"""
from __future__ import annotations

import json

import click

from rmt_deploy.errors import InputError

_DEFAULTS = dict(shots=16, seed=1, batch_size=32, adam_beta1=0.9, adam_beta2=0.999,
                 weight_decay=0.0, score_l2=1e-4, score_init=1e-2, threshold=5e-3, temperature=1.0)
_PRECISION_HELP = ("fp32 (default, as the paper), or bf16 / fp16 autocast on the image tower; the head product, "
                   "logits, losses and gradient dropout stay fp32.")


# every numeric option has a range, checked (and shown in --help) before any work
SHOTS = click.IntRange(min=0)
SEED = click.IntRange(0, 2**32 - 1)
BATCH = click.IntRange(1, 1 << 20)
WORKERS = click.IntRange(0, 256)
LR = click.FloatRange(0, 10, min_open=True)
BETA = click.FloatRange(0, 1, max_open=True)
SCORE = click.FloatRange(-1e3, 1e3)


def _template(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--template checked when parsed: exactly one '{}' for the class name (an InputError: one line, exit 1)."""
    if value is None:
        return None
    from rmt_deploy.training.datasets import check_template

    return check_template(value)


def _groups(value: str) -> tuple[str, ...]:
    groups = tuple(g.strip() for g in value.split(",") if g.strip())
    if not groups:
        raise InputError(f"--mask-groups {value!r} names no group: e.g. attn or attn,mlp")
    return groups


@click.command("train")
@click.option("--model", required=True, help="open_clip model name, e.g. ViT-B-16 or rmt-tiny-vit.")
@click.option("--pretrained", default=None, metavar="TAG|PATH",
              help="open_clip pretrained tag or local checkpoint file (omit: random weights).")
@click.option("--dataset", required=True, help="dtd, eurosat, ..., imagenet, or imagefolder.")
@click.option("--data-root", required=True, type=click.Path(), help="Folder holding the dataset (CoOp layout).")
@click.option("--out", required=True, type=click.Path(), help="Output folder for <task>.rmtask, metrics.json, checkpoints.")
@click.option("--task", default=None, help="Task name (default: the dataset name).")
@click.option("--template", default=None, callback=_template, help="Prompt template with one {} for the class name "
              "(default: the dataset's, e.g. '{} texture.' for dtd, 'a photo of a {}.' for imagefolder).")
@click.option("--shots", default=_DEFAULTS["shots"], show_default=True, type=SHOTS, help="Images per class; 0 = all.")
@click.option("--seed", default=_DEFAULTS["seed"], show_default=True, type=SEED,
              help="Few-shot sample and training seed.")
@click.option("--epochs", type=click.IntRange(1, 10_000), default=None,
              help="Epochs (default: the paper's, 30; ImageNet 10).")
@click.option("--batch-size", default=_DEFAULTS["batch_size"], show_default=True, type=BATCH,
              help="Global batch size, split evenly over torchrun processes.")
@click.option("--lr", type=LR, default=None,
              help="Adam learning rate, cosine per epoch (default: the paper's, 8e-5; ImageNet 3e-5).")
@click.option("--adam-beta1", default=_DEFAULTS["adam_beta1"], show_default=True, type=BETA)
@click.option("--adam-beta2", default=_DEFAULTS["adam_beta2"], show_default=True, type=BETA)
@click.option("--weight-decay", default=_DEFAULTS["weight_decay"], show_default=True,
              type=click.FloatRange(0, 10))
@click.option("--score-l2", default=_DEFAULTS["score_l2"], show_default=True, type=click.FloatRange(0, 1e3),
              help="Weight of sum ||S||_2.")
@click.option("--score-init", default=_DEFAULTS["score_init"], show_default=True, type=SCORE,
              help="Initial score of every weight; must exceed --threshold.")
@click.option("--threshold", default=_DEFAULTS["threshold"], show_default=True, type=SCORE,
              help="Mask = 1[S > threshold].")
@click.option("--gdr-lambda", type=click.FloatRange(0, 1), default=None,
              help="Gradient dropout strength; < 1 leaks dropped gradients (default: the authors' per-dataset "
                   "value, 0.3 at 16 shots except ImageNet, SUN397, Food101; otherwise 1.0).")
@click.option("--no-gdr", is_flag=True, help="Plain mask tuning: no teacher, no gradient dropout.")
@click.option("--temperature", default=_DEFAULTS["temperature"], show_default=True,
              type=click.FloatRange(0, 1e3, min_open=True), help="Teacher temperature.")
@click.option("--mask-groups", default="attn", show_default=True,
              help="Comma-separated: attn, mlp, conv (every other convolution), conv1 (the first one); "
                   "see docs/families.md.")
@click.option("--subsample", default="all", show_default=True,
              help="Classes to train on: all, or base (the first half, for base-to-new generalisation).")
@click.option("--head", default="zeroshot", show_default=True,
              help="Task head: zeroshot (class prompts), coop (CoOp prompts learned with the masks), "
                   "tip-adapter (Tip-Adapter's cache over the masked encoder), tip-adapter-f (its keys fine-tuned).")
@click.option("--coop-n-ctx", default=16, show_default=True, type=click.IntRange(1, 64),
              help="CoOp context tokens (random init N(0, 0.02)).")
@click.option("--coop-ctx-init", default="", help="Initialise CoOp's context from a phrase, e.g. 'a photo of a'.")
@click.option("--coop-lr", default=0.002, show_default=True, type=LR,
              help="CoOp's SGD learning rate (one warm-up epoch at 1e-5, then cosine).")
@click.option("--tip-views", default=10, show_default=True, type=click.IntRange(1, 1000),
              help="Augmented views averaged into each cache key.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--precision", default="fp32", show_default=True, help=_PRECISION_HELP)
@click.option("--workers", default=4, show_default=True, type=WORKERS, help="DataLoader worker processes.")
@click.option("--eval-batch-size", default=64, show_default=True, type=BATCH, help="Images per evaluation batch.")
@click.option("--keep-checkpoints", default=1, show_default=True, type=click.IntRange(min=0),
              help="Newest epoch checkpoints to keep (0 = all).")
@click.option("--resume", is_flag=True,
              help="Continue from the newest checkpoint in --out (a larger --epochs extends the run).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def train(**options) -> None:
    """Train a task's masks with Regularized Mask Tuning (R-AMT); writes OUT/<task>.rmtask."""
    from rmt_deploy.training.trainer import TrainConfig, train_task

    options["gdr"] = not options.pop("no_gdr")
    options["progress"] = not options.pop("no_progress")
    options["mask_groups"] = _groups(options["mask_groups"])
    result = train_task(TrainConfig(**options))
    m = result.metrics
    if m:  # rank 0
        click.echo(f"task {m['task']} ({m['head']} head): test accuracy {100 * m['test_accuracy']:.2f}% "
                   f"(zero-shot {100 * m['zero_shot_test_accuracy']:.2f}%), "
                   f"sparsity {100 * m['sparsity']:.2f}%, {m['epochs']} epochs, {m['images_per_s']:.1f} images/s")
        click.echo(f"wrote {result.taskpack} and {result.metrics_path}")


@click.command("eval")
@click.option("--task", "task_path", required=True, type=click.Path(), help="A <task>.rmtask file.")
@click.option("--dataset", required=True)
@click.option("--data-root", required=True, type=click.Path())
@click.option("--pretrained", default=None, metavar="TAG|PATH", help="The base the task was trained on.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]))
@click.option("--shots", default=0, show_default=True, type=SHOTS,
              help="Few-shot sample of train/val (0 = full split).")
@click.option("--seed", default=1, show_default=True, type=SEED, help="Few-shot sample seed.")
@click.option("--batch-size", default=64, show_default=True, type=BATCH, help="Images per batch.")
@click.option("--device", default="auto", show_default=True)
@click.option("--workers", default=2, show_default=True, type=WORKERS, help="DataLoader worker processes.")
@click.option("--precision", default="fp32", show_default=True, help=_PRECISION_HELP)
@click.option("--subsample", default="all", show_default=True,
              help="Classes to score: all, base or new (base-to-new generalisation).")
@click.option("--text-head", is_flag=True,
              help="Encode classes the task was not trained on (e.g. --subsample new) with its template.")
@click.option("--zero-shot", is_flag=True, help="Leave the masks off: the zero-shot baseline with the same head.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def evaluate(task_path, as_json, **options) -> None:
    """Report a TaskPack's top-1 accuracy on a dataset split, or on a class subset of its classes
    (e.g. ImageNet-A/R for a task trained on ImageNet)."""
    from rmt_deploy.training.evaluation import EvalConfig, evaluate_taskpack

    result = evaluate_taskpack(EvalConfig(task=task_path, **options))
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        click.echo(f"task {result.task} on {result.dataset} {result.split}: accuracy "
                   f"{100 * result.accuracy:.2f}% ({result.correct}/{result.total})")
