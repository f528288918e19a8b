"""The demo's report: report.json, report.md, report.png and the printed summary."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rmt_deploy.errors import require

REAL_MODEL_HINT = (
    "rmt-deploy train --model ViT-B-16 --pretrained openai --dataset dtd --data-root DATA --shots 16 --out runs/dtd\n"
    "rmt-deploy export --model ViT-B-16 --pretrained openai --task runs/dtd/dtd.rmtask --out bundle --mode both"
)


def _rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    disk = report["bench"]["disk"]["tasks"]
    for name, metrics in report["training"].items():
        rows.append({
            "task": name,
            "classes": len(report["tasks"][name]["classes"]),
            "zero_shot": metrics.get("zero_shot_test_accuracy"),
            "masked": metrics.get("test_accuracy"),
            "served": report["serving"][name]["accuracy"],
            "sparsity": metrics.get("sparsity"),
            "rmtask_bytes": disk[name]["rmtask_bytes"],
            "folded_bytes": disk[name].get("folded_bytes"),
        })
    return rows


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _latency(report: dict[str, Any], kind: str, batch: int) -> float | None:
    values = [r["p50"] for r in report["bench"]["latency"] if r["kind"] == kind and r["batch"] == batch]
    return min(values) if values else None


def summary_text(report: dict[str, Any]) -> str:
    """The summary the demo prints: accuracy, sparsity, bytes, switch time and latency."""
    cfg = report["config"]
    lines = [
        f"rmt-deploy demo: {cfg['model']} with RANDOM weights (seed {cfg['seed']}): no pretrained CLIP can be "
        "downloaded offline,",
        "so accuracies show the pipeline working, not what CLIP reaches; see the real-model commands below.",
        "",
        f"{'task':<10} {'classes':>7} {'zero-shot':>9} {'masked':>8} {'served':>8} {'zeros':>7} "
        f"{'.rmtask':>9} {'folded':>10}",
    ]
    for row in _rows(report):
        folded = f"{row['folded_bytes']:,}" if row["folded_bytes"] else "-"
        lines.append(f"{row['task']:<10} {row['classes']:>7} {_pct(row['zero_shot']):>9} {_pct(row['masked']):>8} "
                     f"{_pct(row['served']):>8} {_pct(row['sparsity']):>7} {row['rmtask_bytes']:>9,} {folded:>10}")
    switch = report["bench"]["switch"]
    lines.append("")
    parts = [f"{label} {switch[key]['p50']:.3f} ms" for key, label in
             (("cached_ms", "cached"), ("uncached_ms", "uncached"), ("naive_ms", "naive new session"))
             if key in switch]
    lines.append("task switch (p50): " + " | ".join(parts))
    for batch in (1, 8):
        shared, folded = _latency(report, "shared", batch), _latency(report, "folded", batch)
        if shared is not None and folded is not None:
            lines.append(f"latency batch {batch} (p50): shared engine {shared:.2f} ms | folded model {folded:.2f} ms "
                         f"({shared / folded:.2f}x)")
    lines += ["", f"backend {report['serving']['backend']}; total {report['timings']['total_s']:.0f} s; "
              f"report in {report.get('out', '.')}/report.md", "", "With a network and a real CLIP:", REAL_MODEL_HINT]
    return "\n".join(lines)


def _markdown(report: dict[str, Any]) -> str:
    lines = ["# rmt-deploy demo report", "", "```", summary_text(report), "```", "",
             "| task | classes | zero-shot | masked (trainer) | masked (served) | zeros | .rmtask bytes | folded bytes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in _rows(report):
        lines.append(f"| {r['task']} | {r['classes']} | {_pct(r['zero_shot'])} | {_pct(r['masked'])} | "
                     f"{_pct(r['served'])} | {_pct(r['sparsity'])} | {r['rmtask_bytes']:,} | "
                     f"{r['folded_bytes'] or '-'} |")
    lines += ["", "![accuracy and switch time](report.png)", "", "![latency](bench.png)", "",
              "Stage timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["timings"].items())]
    return "\n".join(lines) + "\n"


def _plot(report: dict[str, Any], path: Path) -> None:
    matplotlib = require("matplotlib", "demo")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = _rows(report)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    x = np.arange(len(rows))
    for offset, key, label in ((-0.2, "zero_shot", "zero-shot"), (0.2, "served", "masked (served)")):
        bars = ax.bar(x + offset, [100 * (r[key] or 0) for r in rows], 0.4, label=label)
        ax.bar_label(bars, fmt="%.0f")
    ax.set_xticks(x, [r["task"] for r in rows])
    ax.set(ylabel="test accuracy (%)", ylim=(0, 105),
           title=f"{report['config']['model']} (random weights): zero-shot vs masks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], folder: Path) -> None:
    """Write report.json, report.md, report.png and bench.png into folder."""
    from rmt_deploy.artifacts.staging import write_json
    from rmt_deploy.bench.report import plot

    write_json(folder / "report.json", report)
    (folder / "report.md").write_text(_markdown(report))
    _plot(report, folder / "report.png")
    plot(report["bench"], folder / "bench.png")
