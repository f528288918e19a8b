"""Accuracy vs shots: our R-AMT average (and zero-shot) beside the published R-AMT curve."""
from __future__ import annotations

import io

from published import PUBLISHED_RMT_AVERAGE_BY_SHOTS


def shots_plot(few_shot: dict) -> bytes:
    """PNG bytes of the average accuracy over datasets per shot count, ours beside the paper's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted((int(k), t["average"]) for k, t in few_shot.items() if t["average"]["rmt"] is not None)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    if points:
        counts = {a["datasets"] for _, a in points}
        label = f"R-AMT (ours, {'/'.join(map(str, sorted(counts)))} datasets)"
        ax.plot([k for k, _ in points], [a["rmt"] for _, a in points], "o-", label=label)
        ax.plot([k for k, _ in points], [a["zero_shot"] for _, a in points], "x--", color="grey",
                label="zero-shot CLIP (ours)")
    paper = sorted(PUBLISHED_RMT_AVERAGE_BY_SHOTS.items())
    ax.plot([k for k, _ in paper], [v for _, v in paper], "s-", color="tab:red", label="R-AMT (paper, 11 datasets)")
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 2, 4, 8, 16], ["1", "2", "4", "8", "16"])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("average top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
