"""Check 3: the torch CUDA backend. Uncached switch time (cache_tasks=1: every switch rewrites the one
buffer) and cached switch time (cache_tasks=2), against the device's bandwidth floors for the masked
weights (113 MB on ViT-B/16): a device-to-device copy and pinned / pageable host-to-device copies of
as many bytes, timed with CUDA events. Then predict against a plain torch model with the task's masks
multiplied in (logits within 1e-3, latency at batch 1 and the bundle's max batch), and A -> B -> A
exact on the uncached engine (the in-place restore must give back A's weights exactly).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from gpukit import assets, engine_checks
from gpukit.common import FAIL, PASS, Context, cuda_event_ms, median, result, size_text

RTOL = ATOL = 1e-3  # what tests/runtime/test_gpu.py asks of the torch CUDA backend


def bandwidth_floors(torch: Any, nbytes: int, reps: int) -> dict[str, float]:
    """Milliseconds to move `nbytes` on this device: D2D copy, pinned H2D, pageable H2D (CUDA events)."""
    n = nbytes // 4
    src, dst = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
    pinned = torch.empty(n, pin_memory=True)
    pageable = torch.from_numpy(np.ones(n, np.float32))
    out = {"d2d_copy_ms": median(cuda_event_ms(torch, lambda: dst.copy_(src), reps)),
           "h2d_pinned_ms": median(cuda_event_ms(torch, lambda: dst.copy_(pinned, non_blocking=True), reps)),
           "h2d_pageable_ms": median(cuda_event_ms(torch, lambda: dst.copy_(pageable), max(3, reps // 4)))}
    out["d2d_GBps_read_plus_write"] = 2 * nbytes / (out["d2d_copy_ms"] * 1e-3) / 1e9
    out["write_once_floor_ms"] = out["d2d_copy_ms"] / 2  # writing the bytes once at the copy's per-direction rate
    out["h2d_pinned_GBps"] = nbytes / (out["h2d_pinned_ms"] * 1e-3) / 1e9
    return out


class PlainModel:
    """The open_clip model from the same checkpoint with one task's masks multiplied into its weights."""

    def __init__(self, torch: Any, model: str, checkpoint: str, device: str, packs: dict[str, Any]):
        from rmt_deploy.basemodel.loading import load_base

        self.torch, self.device, self.packs = torch, device, packs
        self.model = load_base(model, checkpoint, device=device).model.eval()
        self.params = dict(self.model.named_parameters())
        self.base: dict[str, Any] = {}
        self.task: str | None = None

    def logits(self, task: str, batch: np.ndarray) -> np.ndarray:
        torch, pack = self.torch, self.packs[task]
        with torch.inference_mode():
            if task != self.task:
                for name, keep in pack.masks.items():
                    base = self.base.setdefault(name, self.params[name].detach().clone())
                    self.params[name].copy_(base * torch.from_numpy(keep).to(self.device))
                self.task = task
            emb = self.model.encode_image(torch.from_numpy(batch).to(self.device), normalize=True)
            emb = emb.float().cpu().numpy()
        return pack.logit_scale * emb @ pack.head.T


def run(ctx: Context) -> dict[str, Any]:
    import torch

    from rmt_deploy.artifacts.bundle import Bundle
    from rmt_deploy.artifacts.task_file import TaskPack
    from rmt_deploy.runtime.engine import Engine

    max_batch = 32 if ctx.cuda else 4
    root = assets.torch_bundle(ctx.work, ctx.model, max_batch=max_batch)
    count, nbytes = assets.masked_nbytes(root)
    packs = {p.stem: TaskPack.load(p) for p in assets.packs(ctx.work, ctx.model)}
    a, b = list(packs)
    batch = assets.input_batch(Bundle.open(root).manifest.preprocess.image_size, max_batch)

    def load(cache_tasks: int) -> Engine:
        return Engine.load(root, backend="torch", device=ctx.device, cache_tasks=cache_tasks)

    plain = PlainModel(torch, ctx.model, str(assets.checkpoint(ctx.work, ctx.model)), ctx.device, packs)

    def compare(engine: Engine) -> tuple[dict, list[str]]:
        checked, bad = engine_checks.against(engine, plain.logits, [a, b, a], batch, RTOL, ATOL,
                                             "the plain torch model")
        ctx.log(f"vs plain torch: {checked}")
        return {"vs_plain_torch": checked,
                "predict": engine_checks.latency(engine, plain.logits, a, batch, [1, max_batch], ctx.reps)}, bad

    ctx.log(f"{ctx.model}: {count:,} masked weights; engines on {ctx.device}")
    figures, failures = engine_checks.switching(load, a, b, batch, ctx.reps, then=compare)
    figures.update(model=ctx.model, masked_weights=count, masked_mb=nbytes / 1e6, max_batch=max_batch)
    text = (f"uncached switch {figures['uncached_switch_ms']:.2f} ms, cached {figures['cached_switch_ms']:.3f} ms "
            f"for {size_text(nbytes)}")
    if ctx.cuda:
        figures["floors"] = floors = bandwidth_floors(torch, nbytes, ctx.reps)
        figures["uncached_vs_d2d_floor"] = figures["uncached_switch_ms"] / floors["d2d_copy_ms"]
        figures["uncached_vs_h2d_pageable"] = figures["uncached_switch_ms"] / floors["h2d_pageable_ms"]
        text += (f" (D2D copy floor {floors['d2d_copy_ms'] * 1e3:.0f} us: {figures['uncached_vs_d2d_floor']:.0f}x; "
                 f"H2D pageable {floors['h2d_pageable_ms']:.2f} ms, pinned {floors['h2d_pinned_ms']:.2f} ms)")
    big = figures["predict"][f"batch_{max_batch}"]
    text += f"; predict batch {max_batch} {big['ratio']:.2f}x plain torch"
    if failures:
        return result(FAIL, "; ".join(failures) + f"; {text}", **figures)
    exact = "A->B->A bit-exact" if figures["a_b_a_bit_exact"] else "A->B->A within run-to-run noise"
    return result(PASS, f"{text}; logits match plain torch, {exact}", **figures)
