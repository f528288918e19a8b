"""What an export wrote: file sizes, per-task storage, verification errors, as a printable table."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rmt_deploy.export.verify import Check


def human_size(size: int) -> str:
    """Bytes as a short human-readable string (1024-based)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


@dataclass
class TaskReport:
    """One task's storage: its .rmtask, its folded model (if exported) and their ratio."""

    name: str
    rmtask_bytes: int
    folded_bytes: int | None = None
    folded_estimate_bytes: int = 0  # the shared base's size: what a folded copy would cost

    @property
    def storage_ratio(self) -> float:
        """Per-task storage, folded over shared (.rmtask); estimated from the base if not folded."""
        folded = self.folded_bytes if self.folded_bytes is not None else self.folded_estimate_bytes
        return folded / max(self.rmtask_bytes, 1)


@dataclass
class ExportReport:
    """Result of export_bundle: where the bundle is, its files and sizes, and verification results."""

    out: Path
    target: str
    mode: str
    precision: str
    files: dict[str, int] = field(default_factory=dict)  # bundle-relative path -> bytes
    tasks: list[TaskReport] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def verified(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    def table(self) -> str:
        """Files and sizes, per-task storage ratio folded/shared, and verification lines."""
        lines = [f"bundle {self.out} ({self.mode}, {self.target}, {self.precision}) in {self.seconds:.1f} s",
                 f"{'file':<44} {'size':>11}"]
        for path, size in sorted(self.files.items()):
            lines.append(f"{path:<44} {human_size(size):>11}")
        lines.append(f"{'total':<44} {human_size(self.total_bytes):>11}")
        if self.tasks:
            lines.append("")
            lines.append(f"{'task':<20} {'.rmtask':>11} {'folded':>11} {'folded/shared':>14}")
            for task in self.tasks:
                folded = task.folded_bytes
                shown = human_size(folded) if folded is not None else "~" + human_size(task.folded_estimate_bytes)
                ratio = f"{task.storage_ratio:,.0f}x" + ("" if folded is not None else " (est.)")
                lines.append(f"{task.name:<20} {human_size(task.rmtask_bytes):>11} {shown:>11} {ratio:>14}")
        if self.checks:
            lines.append("")
            lines.append(f"verification ({self.precision} export vs the masked torch fp32 model, "
                         "logits on random inputs):")
            lines.extend("  " + check.line() for check in self.checks)
        return "\n".join(lines)
