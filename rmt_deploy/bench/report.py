"""Bench results for people: a stdout table and a PNG of latency and switch times."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rmt_deploy.errors import require


def _fmt_ms(stats: dict[str, float] | None) -> str:
    return "-" if not stats else f"{stats['p50']:.3f}"


def _sessions_line(results: dict[str, Any]) -> str:
    sessions = results.get("sessions")
    if not sessions:
        return "constant sessions: not recorded"
    if sessions.get("on"):
        return f"constant sessions: {sessions['ready']} ready (each resident task runs with its weights constant)"
    return f"constant sessions: off, {sessions.get('off_because')}"


def format_table(results: dict[str, Any]) -> str:
    """A readable summary: latency per variant and batch, switches, load, memory, disk."""
    lines = [f"bundle {results['bundle']['path']}  model {results['bundle']['model']}  "
             f"backend {results['backend']}  ({results['machine']['cpus']} CPUs)", _sessions_line(results), "",
             f"{'variant':<28} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'img/s':>9}"]
    for row in results["latency"]:
        lines.append(f"{row['variant']:<28} {row['batch']:>5} {row['p50']:>9.2f} {row['p90']:>9.2f} "
                     f"{row['p99']:>9.2f} {row['images_per_s']:>9.1f}")
    switch = results["switch"]
    lines += ["", "switch (p50 ms): cached " + _fmt_ms(switch.get("cached_ms")) + " | uncached "
              + _fmt_ms(switch.get("uncached_ms")) + " | naive (new session on a folded model) "
              + _fmt_ms(switch.get("naive_ms"))]
    load = results["load_s"]
    folded_load = load["folded_sessions"]
    lines.append(f"first load: shared engine {load['shared_engine']:.3f} s"
                 + (f" | folded session {max(folded_load.values()):.3f} s" if folded_load else ""))
    memory = results.get("memory")
    if memory:
        text = f"peak RSS: shared engine with {memory['tasks']} tasks, cache 1: {memory['shared_cache1_mb']:.0f} MiB"
        if "folded_one_session_mb" in memory:
            text += (f" | one folded session: {memory['folded_one_session_mb']:.0f} MiB"
                     f" | ratio {memory['shared_over_folded']:.2f}x")
        lines.append(text)
    disk = results["disk"]
    lines.append(f"disk: shared base {disk['shared_base_bytes']:,} B")
    for task, entry in disk["tasks"].items():
        folded = entry.get("folded_bytes")
        extra = f" | folded {folded:,} B ({folded / entry['rmtask_bytes']:.0f}x)" if folded else ""
        head = f" | {entry['head_kind']} head {entry['head_bytes']:,} B" if "head_kind" in entry else ""
        lines.append(f"  {task}: .rmtask {entry['rmtask_bytes']:,} B{head}{extra}")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str | Path) -> Path:
    """Latency (p50) against batch size per variant, and switch times side by side."""
    matplotlib = require("matplotlib", "demo")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (makes matplotlib.ticker available)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    variants: dict[str, list[tuple[int, float]]] = {}
    for row in results["latency"]:
        variants.setdefault(row["variant"], []).append((row["batch"], row["p50"]))
    for variant, points in variants.items():
        points.sort()
        style = "-" if variant.startswith("shared") else "--" if variant.startswith("folded") else ":"
        left.plot([b for b, _ in points], [ms for _, ms in points], style, marker="o", label=variant)
    left.set(xscale="log", yscale="log", xlabel="batch size", ylabel="latency p50 (ms)",
             title=f"{results['bundle']['model']} on {results['backend']}")
    sizes = sorted({row["batch"] for row in results["latency"]})
    left.set_xticks(sizes, [str(b) for b in sizes])
    left.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    left.legend(fontsize=8)
    names = [("cached_ms", "cached"), ("uncached_ms", "uncached"), ("naive_ms", "naive\n(new session)")]
    shown = [(label, results["switch"][key]["p50"]) for key, label in names if key in results["switch"]]
    bars = right.bar([label for label, _ in shown], [ms for _, ms in shown], color=["#4c9", "#49c", "#c54"][:len(shown)])
    right.bar_label(bars, labels=[f"{ms:.3g} ms" for _, ms in shown])
    right.set(yscale="log", ylabel="switch time p50 (ms)", title="task switch")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
