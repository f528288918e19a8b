"""The paper's protocol as a plan of cells: what to train and evaluate, where each result lives, what is done.

    few_shot/<dataset>/shots<K>/seed<S>/     rmt-deploy train output (metrics.json = done)
    base_to_new/<dataset>/shots<K>/seed<S>/  train on the base half; new.json = the new half evaluated
    domain/<variant>/seed<S>.json            the 16-shot ImageNet task of that seed on a variant
    combined/<head>/<dataset>/shots16/seed<S>/  R-AMT with a CoOp or Tip-Adapter head (`train --head`)

A stopped sweep restarts where it left off: finished cells are skipped, a
training cell with epoch checkpoints resumes from its last one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROTOCOLS = ("few_shot", "base_to_new", "domain", "combined")
SHOTS = (1, 2, 4, 8, 16)
SEEDS = (1, 2, 3)
DOMAIN_SHOTS = 16  # the DG protocol trains ImageNet at 16 shots
DOMAIN_VARIANTS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
COMBINED_SHOTS = 16  # the paper publishes the combined methods at 16 shots
COMBINED_HEADS = ("coop", "tip-adapter")
METRICS = "metrics.json"
NEW = "new.json"


@dataclass(frozen=True)
class Cell:
    """One (protocol, dataset, shots, seed): `train_dir` holds its task; `result` marks it done."""

    protocol: str
    dataset: str  # the training dataset (ImageNet for domain cells)
    shots: int
    seed: int
    target: str | None = None  # domain cells: the variant evaluated
    head: str = "zeroshot"  # combined cells: the head trained with the masks (rmt_deploy.artifacts.heads)

    def train_dir(self, out: Path) -> Path:
        protocol = "few_shot" if self.protocol == "domain" else self.protocol
        if self.protocol == "combined":
            protocol = f"combined/{self.head}"
        return out / protocol / self.dataset / f"shots{self.shots}" / f"seed{self.seed}"

    def result(self, out: Path) -> Path:
        if self.protocol == "domain":
            return out / "domain" / str(self.target) / f"seed{self.seed}.json"
        return self.train_dir(out) / (NEW if self.protocol == "base_to_new" else METRICS)

    def done(self, out: Path) -> bool:
        return self.result(out).is_file()

    def label(self) -> str:
        target = f" -> {self.target}" if self.target else ""
        head = f" {self.head} +" if self.protocol == "combined" else ""
        return f"{self.protocol}{head} {self.dataset}{target} {self.shots}-shot seed {self.seed}"


def plan(protocols: list[str], datasets: list[str], shots: list[int], seeds: list[int],
         variants: list[str] = list(DOMAIN_VARIANTS), domain_shots: int = DOMAIN_SHOTS,
         heads: list[str] = list(COMBINED_HEADS), combined_shots: int = COMBINED_SHOTS) -> list[Cell]:
    """Every cell of the asked protocols, in running order (training cells before the cells that reuse them)."""
    cells = []
    if "few_shot" in protocols:
        cells += [Cell("few_shot", d, k, s) for d in datasets for k in shots for s in seeds]
    if "base_to_new" in protocols:
        cells += [Cell("base_to_new", d, k, s) for d in datasets for k in shots for s in seeds]
    if "domain" in protocols:
        cells += [Cell("domain", "imagenet", domain_shots, s, v) for s in seeds for v in variants]
    if "combined" in protocols:
        cells += [Cell("combined", d, combined_shots, s, head=h) for h in heads for d in datasets for s in seeds]
    return cells
