"""Per-epoch running figures and the tqdm bar that shows them (loss, accuracy, sparsity)."""
from __future__ import annotations

from typing import Any, Iterable

import torch


class EpochMeter:
    """Sums of loss, KL, correct predictions and images over an epoch."""

    def __init__(self) -> None:
        self.loss = self.kl = 0.0
        self.correct = self.seen = 0

    def update(self, step: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        n = int(labels.numel())
        self.loss += float(step["loss"]) * n
        self.kl += float(step["kl"]) * n
        self.correct += int((step["logits"].argmax(-1) == labels).sum())
        self.seen += n

    def postfix(self, sparsity: float) -> dict[str, str]:
        seen = max(self.seen, 1)
        return {"loss": f"{self.loss / seen:.4f}", "acc": f"{self.correct / seen:.3f}",
                "sparsity": f"{100 * sparsity:.2f}%"}

    def totals(self, device: torch.device) -> torch.Tensor:
        return torch.tensor([self.loss, self.kl, float(self.correct), float(self.seen)],
                            dtype=torch.float64, device=device)


class _Silent:
    """A stand-in bar for ranks other than 0 and --no-progress."""

    def __init__(self, iterable: Iterable) -> None:
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass


def progress_bar(iterable: Iterable, desc: str, enabled: bool):
    """A tqdm bar over the batches, or a silent pass-through."""
    if not enabled:
        return _Silent(iterable)
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)
