"""`rmt-deploy bench` on a ViT-B-16 bundle (random weights, CPU): shared engine vs folded models.

Builds two tasks at the paper's sparsity (2.5% zeros), exports a shared + folded
bundle, then runs the bench suite and writes benchmarks/results/bench.{json,txt,png}.

    .venv/bin/python benchmarks/bench_bundle.py [--model ViT-B-16] [--repeats 15] [--batch-sizes 1,8]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from export import make_packs  # noqa: E402  (benchmarks/export.py)

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--zeros", type=float, default=0.025)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch

    from rmt_deploy.bench.report import format_table, plot
    from rmt_deploy.bench.suite import BenchConfig, run_bench
    from rmt_deploy.export import ExportConfig, export_bundle

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = make_packs(args.model, args.seed, args.zeros, folder)
        torch.manual_seed(args.seed)  # export_bundle's load_base draws the same random weights
        export_bundle(ExportConfig(args.model, None, paths, folder / "bundle", mode="both"), progress=True)
        config = BenchConfig(folder / "bundle", batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
                             repeats=args.repeats, threads=args.threads)
        results = run_bench(config)
    results["weights"] = f"random (torch.manual_seed({args.seed})), {100 * args.zeros:.1f}% zeros per task"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "bench.txt").write_text(format_table(results) + "\n")
    plot(results, RESULTS / "bench.png")
    print(format_table(results))


if __name__ == "__main__":
    main()
