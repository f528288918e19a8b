"""Task heads: what turns the shared L2-normalised image embedding into class logits [numpy only].

Kinds (`rmt-deploy train --head`):
- `zeroshot`: logit_scale * f @ T.T, T the class prompts' text features (R-AMT alone).
- `coop`: the same math; T are the text features of CoOp's learned prompts (CoOp + R-AMT).
- `tip-adapter` / `tip-adapter-f`: Tip-Adapter's cache model over the masked encoder
  (Tip-Adapter + R-AMT): logit_scale * f @ T.T + alpha * exp(-beta * (1 - f @ K.T)) @ onehot(labels),
  K the cache keys (stored fp16; `-f` fine-tunes them), labels the class of each key.
One function computes the logits for the trainer, the runtime and the export check, so they agree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rmt_deploy.errors import InputError

ZEROSHOT, COOP, TIP_ADAPTER, TIP_ADAPTER_F = "zeroshot", "coop", "tip-adapter", "tip-adapter-f"
HEAD_KINDS = (ZEROSHOT, COOP, TIP_ADAPTER, TIP_ADAPTER_F)
CACHE_KINDS = (TIP_ADAPTER, TIP_ADAPTER_F)
ALPHA_MAX = 100.0  # Tip-Adapter searches alpha up to 50 (Flowers102)
BETA_MAX = 100.0   # and beta up to 50; beyond 100, exp(-beta * (1 - a)) is 0 for all but exact matches
MAX_CACHE_KEYS = 1 << 20


def check_kind(kind: object) -> str:
    """The head kind, or InputError naming the choices."""
    if kind not in HEAD_KINDS:
        raise InputError(f"head {kind!r} is not one of {', '.join(HEAD_KINDS)}: choose one with --head")
    return str(kind)


def check_alpha_beta(alpha: object, beta: object) -> tuple[float, float]:
    """alpha in [0, 100] (the cache's weight), beta in (0, 100] (its sharpness), finite numbers."""
    for name, value, low_open, high in (("alpha", alpha, False, ALPHA_MAX), ("beta", beta, True, BETA_MAX)):
        number = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
        ok = number and math.isfinite(value) and (value > 0 if low_open else value >= 0) and value <= high
        if not ok:
            interval = f"({0}, {high:g}]" if low_open else f"[0, {high:g}]"
            raise InputError(f"tip-adapter {name} {value!r} is out of range: use a number in {interval}")
    return float(alpha), float(beta)


@dataclass(frozen=True)
class Cache:
    """Tip-Adapter's cache: keys float16 [K, D] (L2-normalised few-shot features), labels int64 [K],
    alpha and beta. `values()` is the one-hot [K, C] matrix the logits multiply by."""

    keys: np.ndarray
    labels: np.ndarray
    alpha: float
    beta: float

    @classmethod
    def build(cls, keys: np.ndarray, labels: np.ndarray, alpha: float, beta: float, classes: int,
              embed_dim: int) -> "Cache":
        """A checked cache for `classes` classes in `embed_dim` dimensions (keys rounded to fp16)."""
        alpha, beta = check_alpha_beta(alpha, beta)
        keys = np.asarray(keys)
        labels = np.asarray(labels)
        check_cache_layout(keys.shape, keys.dtype, labels.shape, labels.dtype, classes, embed_dim)
        if not np.isfinite(keys).all():
            raise InputError("tip-adapter cache keys hold NaN or Inf values: rebuild the cache")
        labels = labels.astype(np.int64)
        check_labels(labels, classes)
        return cls(np.array(keys, dtype=np.float16), labels, alpha, beta)  # a copy: never a view of a file

    @property
    def nbytes(self) -> int:
        """Bytes the cache adds to a task file (keys fp16 + labels int64)."""
        return int(self.keys.nbytes + self.labels.nbytes)

    def values(self, classes: int) -> np.ndarray:
        """One-hot labels as float32 [K, C]."""
        out = np.zeros((self.labels.size, classes), dtype=np.float32)
        out[np.arange(self.labels.size), self.labels] = 1.0
        return out


def check_cache_layout(keys_shape: tuple[int, ...], keys_dtype: np.dtype, labels_shape: tuple[int, ...],
                       labels_dtype: np.dtype, classes: int, embed_dim: int) -> None:
    """Shapes and dtypes of a cache, checked from a header before any array is made from it."""
    if len(keys_shape) != 2 or keys_shape[1] != embed_dim or not 1 <= keys_shape[0] <= MAX_CACHE_KEYS:
        raise InputError(f"tip-adapter cache keys are {list(keys_shape)}, not [keys (1-{MAX_CACHE_KEYS}), "
                         f"{embed_dim}]: rebuild the cache with this base's embedding size")
    if np.dtype(keys_dtype).kind != "f":
        raise InputError(f"tip-adapter cache keys are {np.dtype(keys_dtype)}, not float16: rebuild the cache")
    if tuple(labels_shape) != (keys_shape[0],) or np.dtype(labels_dtype).kind not in "iu":
        raise InputError(f"tip-adapter cache labels are {np.dtype(labels_dtype)} {list(labels_shape)}, not "
                         f"integers [{keys_shape[0]}] (one per key): rebuild the cache")
    if classes < 1:
        raise InputError("tip-adapter cache needs at least one class")


def check_labels(labels: np.ndarray, classes: int) -> None:
    """Every label names one of the task's classes, and every class has at least one key."""
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        bad = int(labels.max()) if labels.max() >= classes else int(labels.min())
        raise InputError(f"tip-adapter cache label {bad} does not match the task's {classes} classes: "
                         "rebuild the cache from this task's training images")
    missing = np.setdiff1d(np.arange(classes), labels)
    if missing.size:
        raise InputError(f"tip-adapter cache has no key for class {int(missing[0])} of {classes} "
                         f"({missing.size} classes without keys): rebuild the cache with every class")


def head_nbytes(text: np.ndarray, cache: Cache | None) -> int:
    """Bytes of a head as stored: text features float32 plus the cache, if any."""
    return int(text.nbytes) + (cache.nbytes if cache is not None else 0)


class HeadMath:
    """The logits of one head, with its constant tensors prepared once (float32)."""

    def __init__(self, text: np.ndarray, logit_scale: float, cache: Cache | None = None) -> None:
        self.text = np.ascontiguousarray(text, dtype=np.float32)  # [C, D]: a float32 head itself, not a copy
        self.scale = np.float32(logit_scale)
        self.cache = cache
        if cache is not None:
            self.keys_t = np.ascontiguousarray(cache.keys.astype(np.float32).T)  # [D, K]
            self.values = cache.values(self.text.shape[0])
            self.alpha, self.beta = np.float32(cache.alpha), np.float32(cache.beta)

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        """float32 [N, C] from L2-normalised embeddings [N, D]."""
        f = np.asarray(embeddings, dtype=np.float32)
        # numpy's own loops, not BLAS: OpenBLAS threads woken by this small product spin after it and take
        # the cores of the next ONNX Runtime run (ConvNeXt-tiny on 2 cores: predict 1.27x -> 1.09x the folded
        # model's run; benchmarks/small_model_overhead.py); [8, 768] x [768, 1000] costs 0.8 ms this way
        out = np.einsum("nd,cd->nc", f, self.text)
        out *= self.scale
        if self.cache is not None:
            affinity = f @ self.keys_t                      # [N, K]
            affinity -= np.float32(1.0)
            affinity *= self.beta                           # beta * (a - 1) = -beta * (1 - a)
            np.exp(affinity, out=affinity)
            cache_logits = affinity @ self.values           # [N, C]
            cache_logits *= self.alpha
            out += cache_logits
        return out


def logits(embeddings: np.ndarray, text: np.ndarray, logit_scale: float, cache: Cache | None = None) -> np.ndarray:
    """One-off head logits (see HeadMath)."""
    return HeadMath(text, logit_scale, cache).logits(embeddings)
