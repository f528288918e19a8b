"""R-AMT training: one step, the epoch loop, and the files a run writes (the config: training.config).

A step (docs/method.md): student logits with masks on; teacher logits with
masks off under no_grad; g_kl = dL_kl/dS and g_ce = d(L_ce + 1e-4 sum||S||_2)/dS
from two backward passes over the one student graph; averaged across ranks;
gradient dropout; Adam. `--no-gdr` is plain mask tuning (one backward, no teacher).
Heads (rmt_deploy.artifacts.heads, training.prompts, training.cache): `coop` learns CoOp's prompt
context on the same cross-entropy, in the same steps (SGD, its own schedule; the teacher
sees the current prompts, detached); the tip-adapter heads build Tip-Adapter's cache over
the trained masked encoder after the last epoch.
"""
from __future__ import annotations

import json
import math
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rmt_deploy.artifacts import heads
from rmt_deploy.artifacts.staging import write_atomic
from rmt_deploy.artifacts.task_file import SUFFIX, TaskPack
from rmt_deploy.basemodel.loading import BaseModel, fingerprint, load_base, maskable_tensors, preprocess_config
from rmt_deploy.basemodel.mask_groups import check_share
from rmt_deploy.errors import InputError
from rmt_deploy.training import cache as tip
from rmt_deploy.training import checkpoint
from rmt_deploy.training.config import ADDED_DEFAULTS, CONFIG_VERSION, TrainConfig  # noqa: F401  (public here too)
from rmt_deploy.training.data import build_dataset, check_training_classes, resolve_dataset, task_name_from
from rmt_deploy.training.distributed import DistContext, init_distributed
from rmt_deploy.training.evaluation import class_head, count_correct, make_loader, sharded
from rmt_deploy.training.loading import SeededSampler, batches, eval_transform, train_transform
from rmt_deploy.training.masking import MaskedCLIP
from rmt_deploy.training.precision import LossScaler, autocast, check_precision
from rmt_deploy.training.progress import EpochMeter, progress_bar
from rmt_deploy.training.prompts import PromptLearner, coop_lr, coop_optimizer
from rmt_deploy.training.regularizer import gradient_dropout, score_penalty, teacher_loss

METRICS_FILE = "metrics.json"
# fields that may differ between a run and its --resume (a larger --epochs extends a run)
_RESUME_FREE = {"resume", "out", "workers", "device", "progress", "keep_checkpoints", "eval_batch_size", "epochs"}


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
             dist: DistContext, scaler: LossScaler | None = None, prompt: PromptLearner | None = None,
             prompt_optimizer: torch.optim.Optimizer | None = None) -> dict[str, torch.Tensor]:
    """One optimisation step of the scores (and CoOp's context, given `prompt`); returns detached
    loss terms and the student logits.

    Autocast (cfg.precision) covers the image tower; logits, losses and gradient dropout are fp32.
    With fp16 the losses are scaled, and a step whose gradients overflow is skipped. The context
    gets the plain cross-entropy gradient: gradient dropout is for the mask scores only.
    """
    scaler = scaler or LossScaler(enabled=False)
    views = model.scores  # gradients are taken per view, then concatenated (see MaskedCLIP.flat_grad)
    text = prompt() if prompt is not None else None
    with autocast(images.device, cfg.precision):
        student = model(images, scores=views, head=text)
    scores = model.flat_scores
    loss_ce = F.cross_entropy(student, labels) + score_penalty(views.values(), cfg.score_l2)
    g_ctx = [] if prompt is None else list(torch.autograd.grad(scaler.scaled(loss_ce), [prompt.ctx],
                                                                retain_graph=True))
    if cfg.gdr:
        with torch.no_grad(), autocast(images.device, cfg.precision):
            teacher = model(images, masked=False, head=None if text is None else text.detach())
        loss_kl = teacher_loss(student, teacher, cfg.temperature)
        g_kl = model.flat_grad(scaler.scaled(loss_kl), views, retain_graph=True)
        g_ce = model.flat_grad(scaler.scaled(loss_ce), views)
        g_ce, g_kl, *g_ctx = dist.average(g_ce, g_kl, *g_ctx)
        if scaler.unscale(g_ce, g_kl, *g_ctx):
            scores.grad = gradient_dropout(g_ce, g_kl, cfg.gdr_lambda, generator)
    else:
        loss_kl = torch.zeros(())
        g_ce, *g_ctx = dist.average(model.flat_grad(scaler.scaled(loss_ce), views), *g_ctx)
        if scaler.unscale(g_ce, *g_ctx):
            scores.grad = g_ce
    if scores.grad is not None:
        optimizer.step()
        if prompt is not None and prompt_optimizer is not None:
            prompt.ctx.grad = g_ctx[0]
            prompt_optimizer.step()
            prompt.ctx.grad = None
    scores.grad = None
    return {"loss": loss_ce.detach(), "kl": loss_kl.detach(), "logits": student.detach()}


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """Cosine decay stepped per epoch, no warm-up (CosineAnnealingLR's closed form, eta_min 0)."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


class _Run:
    """The state of one training run on one rank."""

    def __init__(self, cfg: TrainConfig, dist: DistContext, base: BaseModel | None) -> None:
        self.cfg, self.dist = cfg, dist
        self.out = prepare_out(Path(cfg.out).expanduser())
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # augmentation is seeded per sample (loading.SeededSampler)
        self.data = build_dataset(cfg.dataset, cfg.data_root, cfg.shots, cfg.seed, cfg.subsample)
        if not self.data.train:
            raise InputError(f"dataset {self.data.name} has no training images (a test-only dataset): train on "
                             "its source dataset, e.g. imagenet, and evaluate on it with rmt-deploy eval")
        check_training_classes(self.data)
        self.task = cfg.task or task_name_from(self.data.name)
        check_precision(cfg.precision, dist.device)
        if base is None:
            base = load_base(cfg.model, cfg.pretrained, device=str(dist.device))
        elif base.model_name != cfg.model:
            raise InputError(f"base model {base.model_name!r} does not match --model {cfg.model!r}")
        base.model.to(dist.device).eval()
        self.base = base
        check_share(base.model, cfg.mask_groups, cfg.model)  # refuse groups too small to change the tower
        tensors = maskable_tensors(base.model, cfg.mask_groups, cfg.model)
        self.fingerprint = fingerprint(cfg.model, tensors)
        self.template = cfg.template or self.data.template
        head = class_head(base, self.data.class_names, self.template, dist.device)
        logit_scale = float(base.model.logit_scale.detach().exp())
        self.model = MaskedCLIP(base.model, tensors, head, logit_scale, cfg.threshold, cfg.score_init)
        self.text_head = head.clone()  # the class prompts' features (the buffer below may share memory)
        self.optimizer = torch.optim.Adam([self.model.flat_scores], lr=cfg.lr, weight_decay=cfg.weight_decay,
                                          betas=(cfg.adam_beta1, cfg.adam_beta2))
        self.prompt, self.prompt_optimizer, self.cache, self.search = None, None, None, None
        if cfg.head == heads.COOP:
            self.prompt = PromptLearner(base.model, base.tokenizer, self.data.class_names, cfg.coop_n_ctx,
                                        cfg.coop_ctx_init, torch.Generator().manual_seed(cfg.seed))
            self.prompt_optimizer = coop_optimizer(self.prompt.ctx, cfg.coop_lr)
        self.scaler = LossScaler(enabled=cfg.precision == "fp16")
        self.gdr_generator = torch.Generator(device=dist.device).manual_seed(cfg.seed)  # same on every rank
        self.loader_generator = torch.Generator().manual_seed(cfg.seed + 1000 * dist.rank)
        self.sampler = SeededSampler(
            self.data.train, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=cfg.seed)
        per_rank = _per_rank_batch(cfg.batch_size, dist.world_size)
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
        prompt = {} if self.prompt is None else {
            "prompt_ctx": self.prompt.ctx.detach().cpu(), "prompt_optimizer": self.prompt_optimizer.state_dict()}
        if self.dist.is_main:
            checkpoint.save(self.out, self.epoch, {
                **prompt, "config": self.cfg.to_dict(), "names": list(self.model.names),
                "scores": self.model.flat_scores.detach().cpu(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rng, "history": self.history,
                "train_time": self.train_time, "images_seen": self.images_seen,
            }, keep=self.cfg.keep_checkpoints)
        self.dist.barrier()

    def resume(self) -> None:
        state = checkpoint.load_latest(self.out)
        saved = state["config"]
        now = self.cfg.to_dict()
        changed = [k for k in now if k not in _RESUME_FREE and saved.get(k, ADDED_DEFAULTS.get(k)) != now[k]]
        if changed:
            k = changed[0]
            raise InputError(f"--resume: {k} was {saved.get(k)!r} in the checkpointed run, now {now[k]!r}: "
                             "resume with the same settings or use a new --out")
        if len(state["rng"]) != self.dist.world_size:
            raise InputError(f"--resume: the checkpoint was written by {len(state['rng'])} process(es), "
                             f"this run has {self.dist.world_size}: resume with the same number")
        if list(state["names"]) != self.model.names:
            raise InputError("--resume: the checkpoint masks other tensors: use the same model and --mask-groups")
        if int(state["epoch"]) > self.cfg.epochs:
            raise InputError(f"--resume: the checkpoint is at epoch {int(state['epoch'])}, beyond --epochs "
                             f"{self.cfg.epochs}: resume with --epochs {int(state['epoch'])} or more")
        with torch.no_grad():
            self.model.flat_scores.copy_(state["scores"].to(self.model.flat_scores.device))
        self.optimizer.load_state_dict(state["optimizer"])
        if self.prompt is not None:
            with torch.no_grad():
                self.prompt.ctx.copy_(state["prompt_ctx"].to(self.prompt.ctx.device))
            self.prompt_optimizer.load_state_dict(state["prompt_optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        checkpoint.restore_rng(state["rng"][self.dist.rank], self.generators())
        self.epoch, self.history = int(state["epoch"]), list(state["history"])
        self.train_time, self.images_seen = float(state["train_time"]), int(state["images_seen"])

    def train_epoch(self) -> None:
        cfg, dist = self.cfg, self.dist
        self.sampler.set_epoch(self.epoch)
        lr = cosine_lr(cfg.lr, self.epoch, cfg.epochs)  # a longer --epochs on resume stretches what is left
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.prompt_optimizer is not None:
            for group in self.prompt_optimizer.param_groups:
                group["lr"] = coop_lr(cfg.coop_lr, self.epoch, cfg.epochs)
        meter = EpochMeter()
        start = time.perf_counter()
        bar = progress_bar(batches(self.loader), f"epoch {self.epoch + 1}/{cfg.epochs}", cfg.progress and dist.is_main)
        for images, labels in bar:
            images = images.to(dist.device, non_blocking=True)
            labels = labels.to(dist.device, non_blocking=True)
            out = rmt_step(self.model, images, labels, cfg, self.optimizer, self.gdr_generator, dist, self.scaler,
                           self.prompt, self.prompt_optimizer)
            meter.update(out, labels)
            bar.set_postfix(meter.postfix(self.model.sparsity()), refresh=False)
        dist.check_in_sync(self.model.flat_scores)
        self.train_time += time.perf_counter() - start
        loss, kl, correct, seen = dist.average(meter.totals(self.model.flat_scores.device))[0].tolist()
        self.images_seen += int(round(seen * dist.world_size))
        self.epoch += 1
        self.history.append({"epoch": self.epoch, "loss": loss / max(seen, 1), "kl": kl / max(seen, 1),
                             "train_accuracy": correct / max(seen, 1), "sparsity": self.model.sparsity(),
                             "lr": lr})  # the rate this epoch trained with

    def finish_head(self) -> None:
        """CoOp: the learned prompts' features become the head. Tip-Adapter: build and search the cache."""
        if self.prompt is not None:
            with torch.no_grad():
                self.model.head.copy_(self.prompt())
        elif self.cfg.head in heads.CACHE_KINDS:
            self.cache, self.search = self._build_cache()

    @property
    def _eval_transform(self) -> Any:
        """What a bundle of this base serves: the runtime's transform (not open_clip's torch one)."""
        return eval_transform(preprocess_config(self.base.model))

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast(images.device, self.cfg.precision):
            return self.model.image_features(images).float()

    def _build_cache(self) -> tuple[heads.Cache, tip.Search]:
        cfg, device = self.cfg, self.dist.device
        augment = train_transform(preprocess_config(self.base.model))

        def loader(batch: int) -> Any:
            return lambda sampler: make_loader(self.data.train, augment, batch, cfg.workers, device, sampler=sampler)

        keys, labels = tip.cache_keys(self._encode, loader(cfg.eval_batch_size), self.data.train, cfg.seed, device,
                                      cfg.tip_views)
        if cfg.head == heads.TIP_ADAPTER_F:
            keys = tip.finetune_keys(keys, labels, self._encode, loader(tip.FINETUNE_BATCH), self.data.train,
                                     self.model.head, self.model.logit_scale, cfg.seed, device)
        val_samples = self.data.split("val")
        val = None
        if val_samples:
            val = tip.features(self._encode, make_loader(val_samples, self._eval_transform, cfg.eval_batch_size,
                                                         cfg.workers, device), device)
        scale = tip.SEARCH_SCALES.get(resolve_dataset(cfg.dataset), tip.DEFAULT_SEARCH_SCALE)
        return tip.build_cache(keys, labels, self.model.head.cpu().numpy(), self.model.logit_scale, val, scale)

    def _eval_fns(self) -> dict[str, Any]:
        """Logit functions per metric prefix: the task's head first, then its baselines."""
        zero_shot = lambda x: self.model(x, masked=False, head=self.text_head)  # noqa: E731
        if self.cache is not None:
            math = heads.HeadMath(self.model.head.cpu().numpy(), self.model.logit_scale, self.cache)

            def tip_logits(x: torch.Tensor) -> torch.Tensor:  # the runtime's numpy head on the masked features
                f = F.normalize(self._encode(x), dim=-1).cpu().numpy()
                return torch.from_numpy(math.logits(f)).to(x.device)

            return {"": tip_logits, "mask_only_": self.model, "zero_shot_": zero_shot}
        if self.prompt is not None:
            return {"": self.model, "prompt_only_": lambda x: self.model(x, masked=False), "zero_shot_": zero_shot}
        return {"": self.model, "zero_shot_": zero_shot}

    def evaluate(self) -> dict[str, float]:
        """Accuracy of the task (masks + head) and its baselines on the test and val splits, sharded over ranks:
        zero_shot_ = masks off with the class prompts; mask_only_ / prompt_only_ = one half of a combined head."""
        metrics = {}
        fns = self._eval_fns()
        for split in ("test", "val"):
            samples = sharded(self.data.split(split), self.dist)
            loader = make_loader(samples, self._eval_transform, self.cfg.eval_batch_size, self.cfg.workers,
                                 self.dist.device)
            correct, total = count_correct(list(fns.values()), loader, self.dist.device, self.cfg.precision)
            *correct, total = self.dist.sum_counts(*correct, total)
            if total:
                for prefix, count in zip(fns, correct):
                    metrics[f"{prefix}{split}_accuracy"] = count / total
            metrics[f"{split}_images"] = total
        return metrics

    def head_metrics(self) -> dict[str, Any]:
        """What the head is and costs: kind, bytes, and Tip-Adapter's searched alpha and beta."""
        out: dict[str, Any] = {"head": self.cfg.head,
                               "head_bytes": heads.head_nbytes(self.model.head.cpu().numpy(), self.cache)}
        if self.search is not None:
            out.update(tip_alpha=self.search.alpha, tip_beta=self.search.beta,
                       tip_search_val_accuracy=self.search.val_accuracy, tip_cache_keys=int(self.cache.labels.size))
        return out

    def write_outputs(self, eval_metrics: dict[str, float], wall: float) -> TrainResult:
        masks = {n: m.cpu().numpy() for n, m in self.model.binary_masks().items()}
        per_tensor = {n: float(1.0 - m.mean()) for n, m in masks.items()}
        metrics = {
            "task": self.task, "dataset": self.data.name, "model": self.cfg.model,
            "pretrained": pretrained_label(self.cfg.pretrained), "quick_gelu": self.base.quick_gelu,
            "precision": self.cfg.precision, "subsample": self.cfg.subsample, "shots": self.cfg.shots, "seed": self.cfg.seed,
            **eval_metrics, **self.head_metrics(),
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
            head_kind=self.cfg.head, cache=self.cache,
        )
        pack_path = pack.save(self.out / f"{self.task}{SUFFIX}")
        metrics_path = self.out / METRICS_FILE
        write_atomic(metrics_path, (json.dumps(metrics, indent=2) + "\n").encode())
        return TrainResult(pack_path, metrics_path, metrics)


def _per_rank_batch(batch_size: int, world_size: int) -> int:
    """The global batch split evenly over ranks; an uneven split would change the batch the paper trains with."""
    if batch_size % world_size:
        lower = batch_size - batch_size % world_size
        options = f"{lower} or {lower + world_size}" if lower else f"{world_size}"
        raise InputError(f"--batch-size {batch_size} does not split evenly over {world_size} processes: "
                         f"use {options}, or another number of processes")
    return batch_size // world_size


def pretrained_label(pretrained: str | None) -> str | None:
    """What metrics record for the weights: the tag, or a checkpoint's file name (its folder may be temporary)."""
    if pretrained is None or not Path(pretrained).expanduser().is_file():
        return pretrained
    return Path(pretrained).name


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
        run.finish_head()
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

