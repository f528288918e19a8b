"""Reproduce the paper's protocol in one command: few-shot sweep, base-to-new, domain generalisation, tables, plot.

    python benchmarks/paper/run.py --data-root ~/data --out runs/paper
    python benchmarks/paper/run.py --data-root ~/data --out runs/paper --protocols few_shot --shots 16
    torchrun --nproc_per_node 4 benchmarks/paper/run.py --data-root ~/data --out runs/paper
    python benchmarks/paper/run.py --data-root ~/data --out runs/paper --table-only

Defaults: ViT-B-16 'openai' (QuickGELU, as the weights were trained), shots
1, 2, 4, 8, 16 x seeds 1, 2, 3 x the 11 CoOp datasets, and R-AMT combined with
CoOp and with Tip-Adapter at 16 shots (`--heads`); lr, epochs and lambda
per dataset from rmt_deploy.training.recipe (the same values `rmt-deploy
train` uses). The plan (plan.py) is resumable: finished cells are skipped and
interrupted training resumes from its last epoch checkpoint. Under torchrun
every rank trains (one process group for the whole sweep); only rank 0
evaluates extra splits, prints and writes OUT/table.md, OUT/summary.json and
OUT/shots.png.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import plan as planning  # noqa: E402
import table  # noqa: E402
from plot import shots_plot  # noqa: E402
from published import PUBLISHED_16_SHOT  # noqa: E402

from rmt_deploy.artifacts.staging import write_atomic  # noqa: E402
from rmt_deploy.artifacts.task_file import SUFFIX  # noqa: E402
from rmt_deploy.training.distributed import DistContext, init_distributed  # noqa: E402
from rmt_deploy.training.evaluation import EvalConfig, evaluate_taskpack  # noqa: E402
from rmt_deploy.training.trainer import TrainConfig, train_task  # noqa: E402

DATASETS = list(PUBLISHED_16_SHOT)
TABLE, SUMMARY, PLOT = "table.md", "summary.json", "shots.png"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--pretrained", default="openai")
    parser.add_argument("--protocols", nargs="+", default=list(planning.PROTOCOLS), choices=planning.PROTOCOLS)
    parser.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS, metavar="DATASET")
    parser.add_argument("--shots", type=int, nargs="+", default=list(planning.SHOTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(planning.SEEDS))
    parser.add_argument("--domain-variants", nargs="+", default=list(planning.DOMAIN_VARIANTS),
                        choices=planning.DOMAIN_VARIANTS, metavar="VARIANT")
    parser.add_argument("--domain-shots", type=int, default=planning.DOMAIN_SHOTS)
    parser.add_argument("--heads", nargs="+", default=list(planning.COMBINED_HEADS),
                        choices=["coop", "tip-adapter", "tip-adapter-f"],
                        help="combined cells: the heads trained with the masks")
    parser.add_argument("--combined-shots", type=int, default=planning.COMBINED_SHOTS)
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe (30; ImageNet 10)")
    parser.add_argument("--lr", type=float, default=None, help="override the recipe (8e-5; ImageNet 3e-5)")
    parser.add_argument("--gdr-lambda", type=float, default=None, help="override the per-dataset lambda")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="fp32", help="fp32 (the paper), bf16 or fp16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--table-only", action="store_true", help="render the tables from finished cells")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and their state, run nothing")
    return parser.parse_args(argv)


class Sweep:
    """Runs the cells of a plan on this rank; rank 0 alone evaluates extra splits, prints and writes."""

    def __init__(self, args: argparse.Namespace, dist: DistContext) -> None:
        self.args, self.dist, self.out, self.base = args, dist, Path(args.out), None

    def say(self, text: str) -> None:
        if self.dist.is_main:
            print(text, flush=True)

    def run(self, cells: list[planning.Cell]) -> None:
        for cell in cells:
            if cell.done(self.out):
                self.say(f"{cell.label()}: done, skipped")
                continue
            self.say(f"{cell.label()}: running")
            self.train(cell)
            if cell.protocol not in ("few_shot", "combined"):
                self.on_rank0(lambda: self.evaluate(cell))
            self.say(f"{cell.label()}: finished")

    def train(self, cell: planning.Cell) -> None:
        """Train (or resume, or reuse) the task a cell needs; every rank takes part."""
        folder = cell.train_dir(self.out)
        if (folder / planning.METRICS).is_file():
            return
        if self.base is None:  # one base for the whole sweep; training never changes its weights
            from rmt_deploy.basemodel.loading import load_base

            self.base = load_base(self.args.model, self.args.pretrained, device=str(self.dist.device))
        a = self.args
        cfg = TrainConfig(
            model=a.model, pretrained=a.pretrained, dataset=cell.dataset, data_root=a.data_root, out=str(folder),
            shots=cell.shots, seed=cell.seed, epochs=a.epochs, lr=a.lr, gdr_lambda=a.gdr_lambda,
            batch_size=a.batch_size, precision=a.precision, device=a.device, workers=a.workers,
            subsample="base" if cell.protocol == "base_to_new" else "all", progress=False, head=cell.head,
            resume=any((folder / "checkpoints").glob("epoch_*.pt")))
        m = train_task(cfg, base=self.base).metrics
        if m:  # rank 0
            self.say(f"  test {100 * m['test_accuracy']:.2f}% (zero-shot {100 * m['zero_shot_test_accuracy']:.2f}%), "
                     f"sparsity {100 * m['sparsity']:.2f}%, lr {cfg.resolved().lr}, lambda {cfg.resolved().gdr_lambda}")

    def evaluate(self, cell: planning.Cell) -> None:
        """The new half (base-to-new) or a variant (domain), with the masks and without; rank 0 only."""
        pack = cell.train_dir(self.out) / f"{task_of(cell)}{SUFFIX}"
        dataset = cell.target if cell.protocol == "domain" else cell.dataset
        subsample = "new" if cell.protocol == "base_to_new" else "all"
        results = [evaluate_taskpack(EvalConfig(
            pack, dataset, self.args.data_root, self.args.pretrained, device=self.args.device,
            workers=self.args.workers, precision=self.args.precision, subsample=subsample,
            text_head=subsample == "new", zero_shot=zero_shot)) for zero_shot in (False, True)]
        record = {**results[0].to_dict(), "zero_shot_accuracy": results[1].accuracy}
        path = cell.result(self.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, (json.dumps(record, indent=2) + "\n").encode())
        self.say(f"  {dataset} ({subsample}): {100 * record['accuracy']:.2f}% "
                 f"(zero-shot {100 * record['zero_shot_accuracy']:.2f}%)")

    def on_rank0(self, work) -> None:
        """Run `work` on rank 0 while the other ranks wait."""
        if self.dist.is_main:
            work()
        self.dist.barrier()


def task_of(cell: planning.Cell) -> str:
    """The task name a cell's training writes (the dataset's name)."""
    from rmt_deploy.training.data import resolve_dataset

    return resolve_dataset(cell.dataset)


def summarise(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    summary = {"model": args.model, "pretrained": args.pretrained, "seeds": args.seeds}
    if "few_shot" in args.protocols:
        summary["few_shot"] = table.few_shot(out, args.datasets, args.shots, args.seeds)
    if "base_to_new" in args.protocols:
        summary["base_to_new"] = table.base_to_new(out, args.datasets, args.shots, args.seeds)
    if "domain" in args.protocols:
        summary["domain"] = table.domain(out, args.domain_variants, args.domain_shots, args.seeds)
    if "combined" in args.protocols:
        summary["combined"] = table.combined(out, args.datasets, args.heads, args.combined_shots, args.seeds)
    return summary


def write_reports(args: argparse.Namespace) -> str:
    """OUT/table.md, OUT/summary.json and (with a few-shot table) OUT/shots.png, each written atomically."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(args)
    text = table.markdown(summary, args.seeds)
    write_atomic(out / TABLE, text.encode())
    write_atomic(out / SUMMARY, (json.dumps(summary, indent=2) + "\n").encode())
    if "few_shot" in summary:
        write_atomic(out / PLOT, shots_plot(summary["few_shot"]))
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    cells = planning.plan(args.protocols, args.datasets, args.shots, args.seeds, args.domain_variants,
                          args.domain_shots, args.heads, args.combined_shots)
    if args.dry_run:
        for cell in cells:
            print(f"{cell.label()}: {'done' if cell.done(Path(args.out)) else 'to run'}")
        return 0
    dist = init_distributed(args.device)  # the process group lives for the whole sweep, not one cell
    try:
        sweep = Sweep(args, dist)
        if not args.table_only:
            sweep.run(cells)
        if dist.is_main:
            print(write_reports(args))
        dist.barrier()
    finally:
        dist.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
