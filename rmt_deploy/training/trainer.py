"""R-AMT training: the config, one step, the epoch loop, and the files a run writes.

A step (reference/RMT.md): student logits with masks on; teacher logits with
masks off under no_grad; g_kl = dL_kl/dS and g_ce = d(L_ce + 1e-4 sum||S||_2)/dS
from two backward passes over the one student graph; averaged across ranks;
gradient dropout; Adam. `--no-gdr` is plain mask tuning (one backward, no teacher).
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rmt_deploy.errors import InputError
from rmt_deploy.models import MASK_GROUPS, BaseModel, fingerprint, load_base, maskable_tensors, preprocess_config
from rmt_deploy.taskpack import SUFFIX, TaskPack, check_task_name, write_atomic
from rmt_deploy.training import checkpoint
from rmt_deploy.training.data import build_dataset, task_name_from
from rmt_deploy.training.loading import SeededSampler, batches, train_transform
from rmt_deploy.training.distributed import DistContext, init_distributed
from rmt_deploy.training.evaluation import autocast_for, class_head, count_correct, make_loader, sharded
from rmt_deploy.training.masking import SCORE_INIT, THRESHOLD, MaskedCLIP
from rmt_deploy.training.progress import EpochMeter, progress_bar
from rmt_deploy.training.regularizer import SCORE_L2_WEIGHT, gradient_dropout, score_penalty, teacher_loss

CONFIG_VERSION = 1
METRICS_FILE = "metrics.json"
# fields that may differ between a run and its --resume
_RESUME_FREE = {"resume", "out", "workers", "device", "progress", "keep_checkpoints", "eval_batch_size"}


@dataclass
class TrainConfig:
    """Everything that defines a training run; round-trips through JSON (`to_dict`/`from_dict`)."""

    model: str
    dataset: str
    data_root: str
    out: str
    pretrained: str | None = None
    task: str | None = None  # default: the dataset (or image folder) name
    template: str | None = None  # prompt template with '{}'; default: the dataset's
    shots: int = 16  # per class; <= 0 trains on the full train split
    seed: int = 1
    epochs: int = 30
    batch_size: int = 32  # global: split across torchrun ranks
    lr: float = 8e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    score_l2: float = SCORE_L2_WEIGHT
    score_init: float = SCORE_INIT
    threshold: float = THRESHOLD
    gdr: bool = True
    gdr_lambda: float = 1.0
    temperature: float = 1.0
    mask_groups: tuple[str, ...] = ("attn",)
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA
    workers: int = 4
    eval_batch_size: int = 64
    keep_checkpoints: int = 1
    resume: bool = False
    progress: bool = True
    version: int = field(default=CONFIG_VERSION)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every field."""
        data = dataclasses.asdict(self)
        data["mask_groups"] = list(self.mask_groups)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Build from `to_dict` output; unknown keys are dropped with a warning."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            warnings.warn(f"ignoring unknown TrainConfig keys: {', '.join(unknown)}", stacklevel=2)
        kwargs = {k: v for k, v in data.items() if k in names}
        if "mask_groups" in kwargs:
            kwargs["mask_groups"] = tuple(kwargs["mask_groups"])
        return cls(**kwargs)

    def validate(self) -> "TrainConfig":
        """Explicit checks with the bad value and the fix; returns self."""
        checks = [
            (self.epochs >= 1, f"--epochs {self.epochs}: train for at least 1 epoch"),
            (self.batch_size >= 1, f"--batch-size {self.batch_size}: must be at least 1"),
            (self.lr > 0, f"--lr {self.lr}: the learning rate must be positive"),
            (0.0 <= self.gdr_lambda <= 1.0, f"--gdr-lambda {self.gdr_lambda}: must lie in [0, 1]"),
            (self.temperature > 0, f"temperature {self.temperature}: must be positive"),
            (self.workers >= 0, f"--workers {self.workers}: must be 0 or more"),
            (self.score_init > self.threshold, f"score init {self.score_init} must exceed the threshold "
                                               f"{self.threshold} so every mask starts at 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)
        unknown = [g for g in self.mask_groups if g not in MASK_GROUPS]
        if unknown or not self.mask_groups:
            raise InputError(f"unknown mask group(s) {unknown or list(self.mask_groups)}: "
                             f"choose from {', '.join(MASK_GROUPS)}")
        if self.task is not None:
            check_task_name(self.task)
        return self


@dataclass
class TrainResult:
    """Where a run wrote its task and the metrics it measured."""

    taskpack: Path
    metrics_path: Path
    metrics: dict[str, Any]


def prepare_out(out: Path) -> Path:
    """Create the output folder and prove it is writable, or raise InputError naming it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise InputError(f"output folder {str(out)!r} is not writable ({exc.strerror}): choose another --out") from None
    return out


def rmt_step(model: MaskedCLIP, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
             optimizer: torch.optim.Optimizer, generator: torch.Generator | None,
             dist: DistContext) -> dict[str, torch.Tensor]:
    """One optimisation step of the scores; returns detached loss terms and the student logits."""
    amp = autocast_for(images.device, cfg.amp)
    views = model.scores  # gradients are taken per view, then concatenated (see MaskedCLIP.flat_grad)
    with amp:
        student = model(images, scores=views)
    scores = model.flat_scores
    loss_ce = F.cross_entropy(student, labels) + score_penalty(views.values(), cfg.score_l2)
    if cfg.gdr:
        with torch.no_grad(), autocast_for(images.device, cfg.amp):
            teacher = model(images, masked=False)
        loss_kl = teacher_loss(student, teacher, cfg.temperature)
        g_kl = model.flat_grad(loss_kl, views, retain_graph=True)
        g_ce = model.flat_grad(loss_ce, views)
        g_ce, g_kl = dist.average(g_ce, g_kl)
        scores.grad = gradient_dropout(g_ce, g_kl, cfg.gdr_lambda, generator)
    else:
        loss_kl = torch.zeros(())
        (scores.grad,) = dist.average(model.flat_grad(loss_ce, views))
    optimizer.step()
    scores.grad = None
    return {"loss": loss_ce.detach(), "kl": loss_kl.detach(), "logits": student.detach()}


class _Run:
    """The state of one training run on one rank."""

    def __init__(self, cfg: TrainConfig, dist: DistContext, base: BaseModel | None) -> None:
        self.cfg, self.dist = cfg, dist
        self.out = prepare_out(Path(cfg.out).expanduser())
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # augmentation is seeded per sample (loading.SeededSampler)
        self.data = build_dataset(cfg.dataset, cfg.data_root, cfg.shots, cfg.seed)
        self.task = cfg.task or task_name_from(self.data.name)
        if base is None:
            base = load_base(cfg.model, cfg.pretrained, device=str(dist.device))
        elif base.model_name != cfg.model:
            raise InputError(f"base model {base.model_name!r} does not match --model {cfg.model!r}")
        base.model.to(dist.device).eval()
        self.base = base
        tensors = maskable_tensors(base.model, cfg.mask_groups)
        self.fingerprint = fingerprint(cfg.model, tensors)
        self.template = cfg.template or self.data.template
        head = class_head(base, self.data.class_names, self.template, dist.device)
        logit_scale = float(base.model.logit_scale.detach().exp())
        self.model = MaskedCLIP(base.model, tensors, head, logit_scale, cfg.threshold, cfg.score_init)
        self.optimizer = torch.optim.Adam([self.model.flat_scores], lr=cfg.lr, weight_decay=cfg.weight_decay,
                                          betas=(cfg.adam_beta1, cfg.adam_beta2))
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=cfg.epochs)
        self.gdr_generator = torch.Generator(device=dist.device).manual_seed(cfg.seed)  # same on every rank
        self.loader_generator = torch.Generator().manual_seed(cfg.seed + 1000 * dist.rank)
        self.sampler = SeededSampler(
            self.data.train, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=cfg.seed)
        per_rank = math.ceil(cfg.batch_size / dist.world_size)
        self.loader = make_loader(
            self.data.train, train_transform(preprocess_config(base.model)), per_rank, cfg.workers, dist.device,
            sampler=self.sampler, generator=self.loader_generator,
            drop_last=len(self.sampler) >= per_rank,  # Dassl: drop the last partial batch when there is a full one
        )
        self.epoch, self.history, self.train_time, self.images_seen = 0, [], 0.0, 0

    def generators(self) -> dict[str, torch.Generator]:
        return {"gdr": self.gdr_generator, "loader": self.loader_generator}

    def save_checkpoint(self) -> None:
        rng = self.dist.gather(checkpoint.capture_rng(self.generators()))
        if self.dist.is_main:
            checkpoint.save(self.out, self.epoch, {
                "config": self.cfg.to_dict(), "names": list(self.model.names),
                "scores": self.model.flat_scores.detach().cpu(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": rng, "history": self.history,
                "train_time": self.train_time, "images_seen": self.images_seen,
            }, keep=self.cfg.keep_checkpoints)
        self.dist.barrier()

    def resume(self) -> None:
        state = checkpoint.load_latest(self.out)
        saved = state["config"]
        now = self.cfg.to_dict()
        changed = [k for k in now if k not in _RESUME_FREE and saved.get(k) != now[k]]
        if changed:
            k = changed[0]
            raise InputError(f"--resume: {k} was {saved.get(k)!r} in the checkpointed run, now {now[k]!r}: "
                             "resume with the same settings or use a new --out")
        if len(state["rng"]) != self.dist.world_size:
            raise InputError(f"--resume: the checkpoint was written by {len(state['rng'])} process(es), "
                             f"this run has {self.dist.world_size}: resume with the same number")
        if list(state["names"]) != self.model.names:
            raise InputError("--resume: the checkpoint masks other tensors: use the same model and --mask-groups")
        with torch.no_grad():
            self.model.flat_scores.copy_(state["scores"].to(self.model.flat_scores.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        checkpoint.restore_rng(state["rng"][self.dist.rank], self.generators())
        self.epoch, self.history = int(state["epoch"]), list(state["history"])
        self.train_time, self.images_seen = float(state["train_time"]), int(state["images_seen"])

    def train_epoch(self) -> None:
        cfg, dist = self.cfg, self.dist
        self.sampler.set_epoch(self.epoch)
        meter = EpochMeter()
        start = time.perf_counter()
        bar = progress_bar(batches(self.loader), f"epoch {self.epoch + 1}/{cfg.epochs}", cfg.progress and dist.is_main)
        for images, labels in bar:
            images = images.to(dist.device, non_blocking=True)
            labels = labels.to(dist.device, non_blocking=True)
            out = rmt_step(self.model, images, labels, cfg, self.optimizer, self.gdr_generator, dist)
            meter.update(out, labels)
            bar.set_postfix(meter.postfix(self.model.sparsity()), refresh=False)
        self.scheduler.step()
        dist.check_in_sync(self.model.flat_scores)
        self.train_time += time.perf_counter() - start
        loss, kl, correct, seen = dist.average(meter.totals(self.model.flat_scores.device))[0].tolist()
        self.images_seen += int(round(seen * dist.world_size))
        self.epoch += 1
        self.history.append({"epoch": self.epoch, "loss": loss / max(seen, 1), "kl": kl / max(seen, 1),
                             "train_accuracy": correct / max(seen, 1), "sparsity": self.model.sparsity(),
                             "lr": self.optimizer.param_groups[0]["lr"]})

    def evaluate(self) -> dict[str, float]:
        """Final (masked) and zero-shot (masks off) accuracy on the test split, sharded over ranks."""
        metrics = {}
        for split in ("test", "val"):
            samples = sharded(self.data.split(split), self.dist)
            loader = make_loader(samples, self.base.preprocess, self.cfg.eval_batch_size, self.cfg.workers,
                                 self.dist.device)
            (student, teacher), total = count_correct(
                [self.model, lambda x: self.model(x, masked=False)], loader, self.dist.device, self.cfg.amp)
            student, teacher, total = self.dist.sum_counts(student, teacher, total)
            if total:
                metrics[f"{split}_accuracy"] = student / total
                metrics[f"zero_shot_{split}_accuracy"] = teacher / total
            metrics[f"{split}_images"] = total
        return metrics

    def write_outputs(self, eval_metrics: dict[str, float], wall: float) -> TrainResult:
        masks = {n: m.cpu().numpy() for n, m in self.model.binary_masks().items()}
        per_tensor = {n: float(1.0 - m.mean()) for n, m in masks.items()}
        metrics = {
            "task": self.task, "dataset": self.data.name, "model": self.cfg.model,
            "pretrained": self.cfg.pretrained, "shots": self.cfg.shots, "seed": self.cfg.seed,
            **eval_metrics,
            "sparsity": self.model.sparsity(), "sparsity_per_tensor": per_tensor,
            "masked_weights": int(self.model.flat_scores.numel()), "epochs": self.epoch,
            "train_images": len(self.data.train), "classes": len(self.data.class_names),
            "world_size": self.dist.world_size, "device": str(self.dist.device),
            "wall_time_s": wall, "train_time_s": self.train_time,
            "images_per_s": self.images_seen / self.train_time if self.train_time else 0.0,
            "history": self.history, "hyperparameters": self.cfg.to_dict(),
        }
        pack = TaskPack(
            name=self.task, class_names=self.data.class_names, head=self.model.head.cpu().numpy(), masks=masks,
            base_fingerprint=self.fingerprint, model_name=self.cfg.model, logit_scale=self.model.logit_scale,
            template=self.template,
            metrics={k: v for k, v in metrics.items() if k not in ("history", "hyperparameters")},
            hyperparameters=self.cfg.to_dict(), quick_gelu=self.base.quick_gelu,
        )
        pack_path = pack.save(self.out / f"{self.task}{SUFFIX}")
        metrics_path = self.out / METRICS_FILE
        write_atomic(metrics_path, (json.dumps(metrics, indent=2) + "\n").encode())
        return TrainResult(pack_path, metrics_path, metrics)


def train_task(config: TrainConfig, base: BaseModel | None = None) -> TrainResult:
    """Train one task end to end and write DIR/<task>.rmtask, DIR/metrics.json and checkpoints.

    `base` reuses an already loaded base model (its weights are not changed).
    Under torchrun every rank calls this; rank 0 writes the files.
    """
    cfg = config.validate()
    wall_start = time.perf_counter()
    dist = init_distributed(cfg.device)
    try:
        run = _Run(cfg, dist, base)
        if cfg.resume:
            run.resume()
        while run.epoch < cfg.epochs:
            run.train_epoch()
            run.save_checkpoint()
        eval_metrics = run.evaluate()
        result = None
        if dist.is_main:
            result = run.write_outputs(eval_metrics, time.perf_counter() - wall_start)
        dist.barrier()
        if result is None:
            out = run.out
            result = TrainResult(out / f"{run.task}{SUFFIX}", out / METRICS_FILE, {})
        return result
    finally:
        dist.close()

