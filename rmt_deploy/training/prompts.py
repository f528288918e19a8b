"""CoOp's learnable prompt context over open_clip's frozen text tower (the `coop` head).

CoOp (Zhou et al., IJCV 2022), as its public configs set it: one context shared by all
classes, the class token at the end ("[SOS] ctx_1 .. ctx_M classname . [EOS]"),
M = 16 tokens drawn from N(0, 0.02), or initialised from a phrase such as "a photo of a"
(M = its word count); SGD lr 0.002 (momentum 0.9, weight decay 5e-4, Dassl's defaults),
cosine per epoch after one warm-up epoch at a constant 1e-5. The text tower stays frozen;
only the context vectors learn. The head a task exports is the L2-normalised text features
of the learned prompts, so serving is unchanged.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rmt_deploy.errors import InputError

N_CTX = 16
CTX_STD = 0.02
LR = 0.002
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
WARMUP_EPOCHS = 1
WARMUP_LR = 1e-5


class PromptLearner(nn.Module):
    """Learnable context vectors and the frozen token embeddings around them, for C classes."""

    def __init__(self, model: Any, tokenizer: Any, class_names: Sequence[str], n_ctx: int = N_CTX,
                 ctx_init: str = "", generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.__dict__["text"] = model  # used, not owned: not a submodule, so not in parameters() or state_dict()
        for param in _text_parameters(model):
            param.requires_grad_(False)
        embedding = model.token_embedding
        device, dtype = embedding.weight.device, embedding.weight.dtype
        words = ctx_init.replace("_", " ").split()
        if words:
            n_ctx = len(words)
            with torch.no_grad():
                init = embedding(tokenizer([" ".join(words)]).to(device))[0, 1:1 + n_ctx]
            prefix = " ".join(words)
        else:
            if n_ctx < 1:
                raise InputError(f"--coop-n-ctx {n_ctx}: CoOp needs at least 1 context token (default 16)")
            init = torch.randn(n_ctx, embedding.weight.shape[1], generator=generator).to(device, dtype) * CTX_STD
            prefix = " ".join(["X"] * n_ctx)
        self.ctx = nn.Parameter(init.clone())
        tokens = tokenizer([f"{prefix} {name}." for name in class_names]).to(device)
        with torch.no_grad():
            embedded = embedding(tokens)
        self.register_buffer("tokens", tokens)
        self.register_buffer("token_prefix", embedded[:, :1])            # SOS
        self.register_buffer("token_suffix", embedded[:, 1 + n_ctx:])    # class name, '.', EOS, padding
        self.n_ctx = n_ctx

    def forward(self) -> torch.Tensor:
        """L2-normalised text features of the prompts [C, D], differentiable in the context."""
        model = self.text
        classes = self.tokens.shape[0]
        ctx = self.ctx.unsqueeze(0).expand(classes, -1, -1)
        cast = model.transformer.get_cast_dtype()
        x = torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1).to(cast)
        x = x + model.positional_embedding.to(cast)
        x = model.transformer(x, attn_mask=model.attn_mask)
        x = model.ln_final(x)
        from open_clip.transformer import text_global_pool

        x = text_global_pool(x, self.tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
        projection = model.text_projection
        if projection is not None:
            x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
        return F.normalize(x.float(), dim=-1)


def _text_parameters(model: Any) -> list[nn.Parameter]:
    return [p for name, p in model.named_parameters() if not name.startswith("visual.")]


def coop_optimizer(ctx: nn.Parameter, lr: float) -> torch.optim.Optimizer:
    """CoOp's optimiser: SGD with Dassl's momentum and weight decay."""
    return torch.optim.SGD([ctx], lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def coop_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """Dassl's constant warm-up then cosine: 1e-5 for the first epoch, then cosine over `epochs`
    restarted after the warm-up (WARMUP_RECOUNT), stepped per epoch."""
    if epoch < WARMUP_EPOCHS:
        return WARMUP_LR
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - WARMUP_EPOCHS) / epochs))
