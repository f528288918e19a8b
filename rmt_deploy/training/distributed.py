"""Scale-out under torchrun: process group set-up, gradient averaging, rank-0-only side effects.

R-AMT needs two separately averaged gradients per step (g_kl and g_ce), which
DistributedDataParallel's reducer (one backward, hooked on .grad) does not
give; so the scores are replicated and both gradients are averaged across
ranks in one all-reduce, which is what DDP would do for a single gradient.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from rmt_deploy.errors import InputError, InternalError


@dataclass
class DistContext:
    """This process's place in the job: rank, world size and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def average(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Mean of each tensor over ranks, in one all-reduce (identity on a single process)."""
        if not self.distributed:
            return tensors
        flat = torch.cat([t.reshape(-1) for t in tensors])
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        out, offset = [], 0
        for t in tensors:
            out.append(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        return tuple(out)

    def sum_counts(self, *counts: int) -> list[int]:
        """Integer counts summed over ranks."""
        if not self.distributed:
            return list(counts)
        buffer = torch.tensor(counts, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(buffer)
        return [int(round(v)) for v in buffer.tolist()]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's picklable object, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def check_in_sync(self, tensor: torch.Tensor, what: str = "mask scores") -> None:
        """Raise InternalError if a replicated tensor differs across ranks (checksums compared)."""
        if not self.distributed:
            return
        data = tensor.detach().double()
        sums = torch.stack([data.sum(), data.square().sum()]).tolist()
        if any(other != sums for other in self.gather(sums)):
            raise InternalError(f"{what} diverged across ranks (checksums {self.gather(sums)})")

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.owns_group = False


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """'auto' is CUDA when available, else CPU; 'cuda' without a GPU is an InputError."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise InputError(f"device {device!r} is not one of auto, cpu, cuda")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {device} but torch sees no CUDA GPU: use --device cpu or auto")
        if device == "cuda":
            device = f"cuda:{local_rank % torch.cuda.device_count()}"
        torch.cuda.set_device(torch.device(device))
    return torch.device(device)


def init_distributed(device: str) -> DistContext:
    """Join the torchrun job named by the environment (WORLD_SIZE > 1), or run as one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    ctx = DistContext(rank, world, local_rank, resolved)
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        kwargs = {"device_id": resolved} if resolved.type == "cuda" else {}
        torch.distributed.init_process_group(backend=backend, **kwargs)
        ctx.owns_group = True
    return ctx
