"""Render finished paper runs (OUT/<dataset>/seed<k>/metrics.json) beside the published numbers."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from published import PUBLISHED_16_SHOT, PUBLISHED_RMT_AVERAGE_BY_SHOTS


def collect(out: Path, datasets: list[str], seeds: list[int]) -> dict[str, dict]:
    """Per dataset: the seeds found and their test, zero-shot and sparsity figures (%)."""
    found = {}
    for dataset in datasets:
        runs = []
        for seed in seeds:
            path = out / dataset / f"seed{seed}" / "metrics.json"
            if path.is_file():
                m = json.loads(path.read_text())
                runs.append({"seed": seed, "test": 100 * m["test_accuracy"],
                             "zero_shot": 100 * m["zero_shot_test_accuracy"], "sparsity": 100 * m["sparsity"]})
        found[dataset] = {"runs": runs}
        if runs:
            for key in ("test", "zero_shot", "sparsity"):
                values = [r[key] for r in runs]
                found[dataset][key] = statistics.mean(values)
                found[dataset][f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return found


def _cell(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" + (f" ± {std:.2f}" if std else "")


def render(out: Path, datasets: list[str], seeds: list[int], shots: int) -> tuple[str, dict]:
    """A markdown table (ours vs published zero-shot and R-AMT) and a JSON-able summary."""
    found = collect(out, datasets, seeds)
    published_note = "published: ViT-B/16, 16 shots" if shots == 16 else (
        f"published per-dataset numbers are 16-shot; the published {shots}-shot R-AMT average is "
        f"{PUBLISHED_RMT_AVERAGE_BY_SHOTS.get(shots, 'not reported')}")
    lines = [
        f"R-AMT reproduction, {shots} shots, seeds {', '.join(map(str, seeds))} ({published_note})", "",
        "| dataset | seeds | zero-shot (ours) | zero-shot (paper) | R-AMT (ours) | R-AMT (paper) | delta | sparsity % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ours, paper, zs_ours, zs_paper = [], [], [], []
    for dataset in datasets:
        name, zs_pub, _, _, rmt_pub = PUBLISHED_16_SHOT[dataset]
        row = found[dataset]
        if row["runs"]:
            ours.append(row["test"])
            paper.append(rmt_pub)
            zs_ours.append(row["zero_shot"])
            zs_paper.append(zs_pub)
        delta = f"{row['test'] - rmt_pub:+.2f}" if row["runs"] and shots == 16 else "-"
        lines.append(
            f"| {name} | {len(row['runs'])} | {_cell(row.get('zero_shot'))} | {zs_pub:.2f} | "
            f"{_cell(row.get('test'), row.get('test_std'))} | {rmt_pub:.2f} | {delta} | {_cell(row.get('sparsity'))} |"
        )
    if ours:
        mean = statistics.mean
        delta = f"{mean(ours) - mean(paper):+.2f}" if shots == 16 else "-"
        lines.append(
            f"| average ({len(ours)} datasets) | | {mean(zs_ours):.2f} | {mean(zs_paper):.2f} | {mean(ours):.2f} | "
            f"{mean(paper):.2f} | {delta} | |"
        )
    summary = {"shots": shots, "seeds": seeds, "datasets": found,
               "average_ours": statistics.mean(ours) if ours else None,
               "average_paper_same_datasets": statistics.mean(paper) if paper else None}
    return "\n".join(lines) + "\n", summary
