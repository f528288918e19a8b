"""Reproduce the paper's few-shot table: 11 CoOp datasets x seeds at one shot count, then the table.

    python benchmarks/paper/run.py --data-root ~/data --out runs/paper --shots 16
    python benchmarks/paper/run.py --data-root ~/data --out runs/paper --table-only

Needs the CoOp datasets under --data-root, open_clip weights for --pretrained
(default: ViT-B-16 'openai') and, in practice, a GPU. Each (dataset, seed)
run writes OUT/<dataset>/seed<k>/; finished runs are skipped, so a stopped
sweep continues where it left off. The table (OUT/table.md, OUT/summary.json)
puts the mean test accuracy over seeds beside the published numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from published import IMAGENET_SCHEDULE, PUBLISHED_16_SHOT  # noqa: E402
from table import render  # noqa: E402

DATASETS = list(PUBLISHED_16_SHOT)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--pretrained", default="openai")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS, metavar="DATASET")
    parser.add_argument("--epochs", type=int, default=None, help="override the reference schedule (30; ImageNet 10)")
    parser.add_argument("--lr", type=float, default=None, help="override the reference lr (8e-5; ImageNet 3e-5)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--gdr-lambda", type=float, default=1.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--table-only", action="store_true", help="render the table from finished runs")
    parser.add_argument("--dry-run", action="store_true", help="list the runs, train nothing")
    return parser.parse_args(argv)


def run_config(args: argparse.Namespace, dataset: str, seed: int):
    from rmt_deploy.training.trainer import TrainConfig

    schedule = IMAGENET_SCHEDULE if dataset == "imagenet" else {"epochs": 30, "lr": 8e-5}
    return TrainConfig(
        model=args.model, pretrained=args.pretrained, dataset=dataset, data_root=args.data_root,
        out=str(Path(args.out) / dataset / f"seed{seed}"), shots=args.shots, seed=seed,
        epochs=args.epochs or schedule["epochs"], lr=args.lr or schedule["lr"], batch_size=args.batch_size,
        gdr_lambda=args.gdr_lambda, device=args.device, workers=args.workers,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = Path(args.out)
    if not args.table_only:
        base = None
        for dataset in args.datasets:
            for seed in args.seeds:
                cfg = run_config(args, dataset, seed)
                if (Path(cfg.out) / "metrics.json").is_file():
                    print(f"{dataset} seed {seed}: done, skipped")
                    continue
                print(f"{dataset} seed {seed}: {cfg.epochs} epochs at lr {cfg.lr} -> {cfg.out}", flush=True)
                if args.dry_run:
                    continue
                from rmt_deploy.models import load_base
                from rmt_deploy.training.distributed import resolve_device
                from rmt_deploy.training.trainer import train_task

                if base is None:  # one base for the whole sweep; training never changes its weights
                    base = load_base(args.model, args.pretrained, device=str(resolve_device(args.device)))
                checkpoints = Path(cfg.out) / "checkpoints"
                cfg.resume = checkpoints.is_dir() and any(checkpoints.glob("epoch_*.pt"))
                result = train_task(cfg, base=base)
                m = result.metrics
                print(f"{dataset} seed {seed}: test {100 * m['test_accuracy']:.2f}% "
                      f"(zero-shot {100 * m['zero_shot_test_accuracy']:.2f}%), sparsity {100 * m['sparsity']:.2f}%")
    if args.dry_run:
        return 0
    table, summary = render(out, args.datasets, args.seeds, args.shots)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
