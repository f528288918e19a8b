"""Run every large-model benchmark in turn (ViT-B-16, CPU; edge: six tower families); each writes benchmarks/results/.

    .venv/bin/python benchmarks/run_all.py [--only codec,export,train,runtime,bench,heads,edge]

Run them on a quiet machine: they take tens of minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"
SCRIPTS = {
    "codec": ["mask_codec.py", "--json", str(RESULTS / "mask_codec.json")],
    "export": ["export.py"],
    "train": ["train_step.py"],
    "runtime": ["runtime.py"],
    "bench": ["bench_bundle.py"],
    "heads": ["heads.py"],
    "edge": ["edge_models.py"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SCRIPTS), help="comma-separated: " + ", ".join(SCRIPTS))
    args = parser.parse_args()
    failed = []
    for name in args.only.split(","):
        if name not in SCRIPTS:
            parser.error(f"unknown benchmark {name!r}: choose from {', '.join(SCRIPTS)}")
        script, *options = SCRIPTS[name]
        print(f"== {name}: {script}", flush=True)
        result = subprocess.run([sys.executable, str(HERE / script), *options], stdout=subprocess.PIPE, text=True)
        print(result.stdout, end="", flush=True)
        if name == "codec":  # the only script that prints its report instead of writing a .txt
            (RESULTS / "mask_codec.txt").write_text(result.stdout)
        if result.returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
