"""Collect finished cells (plan.py) and render them like the paper's tables, as Markdown and as JSON."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from plan import METRICS, Cell
from published import (
    METHOD_ALONE_COLUMN,
    PUBLISHED_16_SHOT,
    PUBLISHED_AVERAGE,
    PUBLISHED_COMBINED_AVERAGE,
    PUBLISHED_RMT_AVERAGE_BY_SHOTS,
)


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "seeds": len(values)} if values else {"mean": None, "std": None, "seeds": 0}


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def few_shot(out: Path, datasets: list[str], shots: list[int], seeds: list[int]) -> dict:
    """Per shot count and dataset: test and zero-shot accuracy (%) over seeds, the published figures, delta."""
    summary = {}
    for k in shots:
        rows = {}
        for dataset in datasets:
            runs = [m for s in seeds if (m := _read(Cell("few_shot", dataset, k, s).train_dir(out) / METRICS))]
            name, zs_paper, _, _, rmt_paper = PUBLISHED_16_SHOT.get(dataset, (dataset, None, None, None, None))
            ours = _stats([100 * m["test_accuracy"] for m in runs])
            row = {"name": name, "rmt": ours, "zero_shot": _stats([100 * m["zero_shot_test_accuracy"] for m in runs]),
                   "sparsity": _stats([100 * m["sparsity"] for m in runs]),
                   "zero_shot_paper": zs_paper, "rmt_paper": rmt_paper if k == 16 else None}
            row["delta"] = (ours["mean"] - row["rmt_paper"]) if ours["mean"] is not None and row["rmt_paper"] else None
            rows[dataset] = row
        done = [r for r in rows.values() if r["rmt"]["mean"] is not None]
        average = {"datasets": len(done),
                   "rmt": statistics.mean(r["rmt"]["mean"] for r in done) if done else None,
                   "zero_shot": statistics.mean(r["zero_shot"]["mean"] for r in done) if done else None,
                   # the published per-shot average is over all 11 datasets: comparable only when all are here
                   "rmt_paper": PUBLISHED_RMT_AVERAGE_BY_SHOTS.get(k) if len(done) == len(PUBLISHED_16_SHOT) else None}
        if k == 16 and done and all(r["rmt_paper"] is not None for r in done):
            average["rmt_paper"] = statistics.mean(r["rmt_paper"] for r in done)
        average["delta"] = average["rmt"] - average["rmt_paper"] if done and average["rmt_paper"] else None
        summary[str(k)] = {"datasets": rows, "average": average}
    return summary


def base_to_new(out: Path, datasets: list[str], shots: list[int], seeds: list[int]) -> dict:
    """Per shot count and dataset: base, new and their harmonic mean (%), R-AMT and zero-shot (CoCoOp protocol)."""
    summary = {}
    for k in shots:
        rows = {}
        for dataset in datasets:
            cells = [Cell("base_to_new", dataset, k, s) for s in seeds]
            pairs = [(b, n) for c in cells if (b := _read(c.train_dir(out) / METRICS)) and (n := _read(c.result(out)))]
            row = {"base": _stats([100 * b["test_accuracy"] for b, _ in pairs]),
                   "new": _stats([100 * n["accuracy"] for _, n in pairs]),
                   "zero_shot_base": _stats([100 * b["zero_shot_test_accuracy"] for b, _ in pairs]),
                   "zero_shot_new": _stats([100 * n["zero_shot_accuracy"] for _, n in pairs])}
            row["hm"] = _harmonic(row["base"]["mean"], row["new"]["mean"])
            row["zero_shot_hm"] = _harmonic(row["zero_shot_base"]["mean"], row["zero_shot_new"]["mean"])
            rows[dataset] = row
        summary[str(k)] = rows
    return summary


def _harmonic(a: float | None, b: float | None) -> float | None:
    """The harmonic mean of the mean base and mean new accuracy, as CoCoOp's tables report it."""
    if a is None or b is None or a + b == 0:
        return None
    return 2 * a * b / (a + b)


def domain(out: Path, variants: list[str], shots: int, seeds: list[int]) -> dict:
    """Source (ImageNet) and each target's accuracy (%), R-AMT and zero-shot, over seeds."""
    rows = {}
    source = [m for s in seeds if (m := _read(Cell("domain", "imagenet", shots, s).train_dir(out) / METRICS))]
    rows["imagenet"] = {"rmt": _stats([100 * m["test_accuracy"] for m in source]),
                        "zero_shot": _stats([100 * m["zero_shot_test_accuracy"] for m in source])}
    for variant in variants:
        found = [r for s in seeds if (r := _read(Cell("domain", "imagenet", shots, s, variant).result(out)))]
        rows[variant] = {"rmt": _stats([100 * r["accuracy"] for r in found]),
                         "zero_shot": _stats([100 * r["zero_shot_accuracy"] for r in found])}
    return rows


def combined(out: Path, datasets: list[str], heads: list[str], shots: int, seeds: list[int]) -> dict:
    """Per head and dataset: R-AMT + that head (%), the method alone (paper), R-AMT alone (ours, same shots);
    the average beside the published combined average (comparable only with all 11 datasets)."""
    summary = {}
    for head in heads:
        rows = {}
        for dataset in datasets:
            runs = [m for s in seeds if (m := _read(Cell("combined", dataset, shots, s, head=head).train_dir(out)
                                                    / METRICS))]
            alone = [m for s in seeds if (m := _read(Cell("few_shot", dataset, shots, s).train_dir(out) / METRICS))]
            paper = PUBLISHED_16_SHOT.get(dataset)
            column = METHOD_ALONE_COLUMN.get(head)
            rows[dataset] = {"name": paper[0] if paper else dataset,
                             "combined": _stats([100 * m["test_accuracy"] for m in runs]),
                             "rmt": _stats([100 * m["test_accuracy"] for m in alone]),
                             "method_paper": paper[column] if paper and column and shots == 16 else None}
        done = [r for r in rows.values() if r["combined"]["mean"] is not None]
        alone = [r["rmt"]["mean"] for r in done if r["rmt"]["mean"] is not None]
        all_eleven = len(done) == len(PUBLISHED_16_SHOT) and shots == 16
        average = {"datasets": len(done),
                   "combined": statistics.mean(r["combined"]["mean"] for r in done) if done else None,
                   "rmt": statistics.mean(alone) if alone and len(alone) == len(done) else None,
                   "combined_paper": PUBLISHED_COMBINED_AVERAGE.get(head) if all_eleven else None,
                   "rmt_paper": PUBLISHED_AVERAGE["rmt"] if all_eleven else None}
        average["delta"] = (average["combined"] - average["combined_paper"]
                            if average["combined_paper"] is not None else None)
        summary[head] = {"datasets": rows, "average": average}
    return summary


def _cell(stats: dict | float | None, std: bool = True) -> str:
    if isinstance(stats, dict):
        if stats["mean"] is None:
            return "-"
        return f"{stats['mean']:.2f}" + (f" ± {stats['std']:.2f}" if std and stats["seeds"] > 1 else "")
    return "-" if stats is None else f"{stats:.2f}"


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def markdown(summary: dict, seeds: list[int]) -> str:
    """The tables of whatever protocols the summary holds."""
    lines = [f"# R-AMT reproduction (accuracy %, mean ± std over seeds {', '.join(map(str, seeds))})", ""]
    for k, table in summary.get("few_shot", {}).items():
        lines += [f"## Few-shot, {k} shots", "",
                  "| dataset | seeds | zero-shot (ours) | zero-shot (paper) | R-AMT (ours) | R-AMT (paper) | delta "
                  "| sparsity % |", "|---|---|---|---|---|---|---|---|"]
        for row in table["datasets"].values():
            lines.append(f"| {row['name']} | {row['rmt']['seeds']} | {_cell(row['zero_shot'], False)} | "
                         f"{_cell(row['zero_shot_paper'])} | {_cell(row['rmt'])} | {_cell(row['rmt_paper'])} | "
                         f"{_signed(row['delta'])} | {_cell(row['sparsity'], False)} |")
        a = table["average"]
        lines += [f"| average ({a['datasets']} datasets) | | {_cell(a['zero_shot'])} | | {_cell(a['rmt'])} | "
                  f"{_cell(a['rmt_paper'])} | {_signed(a['delta'])} | |", ""]
    for k, rows in summary.get("base_to_new", {}).items():
        lines += [f"## Base-to-new, {k} shots (train on base classes; HM = harmonic mean)", "",
                  "| dataset | seeds | base | new | HM | zero-shot base | zero-shot new | zero-shot HM |",
                  "|---|---|---|---|---|---|---|---|"]
        for dataset, r in rows.items():
            lines.append(f"| {dataset} | {r['base']['seeds']} | {_cell(r['base'])} | {_cell(r['new'])} | "
                         f"{_cell(r['hm'])} | {_cell(r['zero_shot_base'], False)} | "
                         f"{_cell(r['zero_shot_new'], False)} | {_cell(r['zero_shot_hm'])} |")
        lines.append("")
    for head, table in summary.get("combined", {}).items():
        lines += [f"## R-AMT + {head} head (published: the 16-shot average over the 11 datasets only)", "",
                  f"| dataset | seeds | {head} alone (paper) | R-AMT alone (ours) | R-AMT + {head} (ours) |",
                  "|---|---|---|---|---|"]
        for row in table["datasets"].values():
            lines.append(f"| {row['name']} | {row['combined']['seeds']} | {_cell(row['method_paper'])} | "
                         f"{_cell(row['rmt'])} | {_cell(row['combined'])} |")
        a = table["average"]
        lines += [f"| average ({a['datasets']} datasets) | | | {_cell(a['rmt'])} (paper {_cell(a['rmt_paper'])}) | "
                  f"{_cell(a['combined'])} (paper {_cell(a['combined_paper'])}, delta {_signed(a['delta'])}) |", ""]
    if "domain" in summary:
        lines += ["## Domain generalisation (train ImageNet, evaluate its variants)", "",
                  "| target | seeds | R-AMT | zero-shot | delta |", "|---|---|---|---|---|"]
        for target, r in summary["domain"].items():
            delta = r["rmt"]["mean"] - r["zero_shot"]["mean"] if r["rmt"]["mean"] is not None else None
            lines.append(f"| {target} | {r['rmt']['seeds']} | {_cell(r['rmt'])} | {_cell(r['zero_shot'], False)} | "
                         f"{_signed(delta)} |")
        lines.append("")
    return "\n".join(lines)
