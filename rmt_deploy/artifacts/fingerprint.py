"""Base-model fingerprint: sha256 over the masked tensors' base values and the model name.

numpy only, so the runtime can check packs against a base without torch.
"""
from __future__ import annotations

import hashlib
from typing import Mapping

import numpy as np


def fingerprint_arrays(model_name: str, tensors: Mapping[str, np.ndarray]) -> str:
    """Return 'sha256:<hex>' over model name and each tensor's name, shape, dtype and bytes."""
    digest = hashlib.sha256()
    digest.update(f"model={model_name}\n".encode())
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        header = f"{name}|{list(array.shape)}|{array.dtype.str}\n"
        digest.update(header.encode())
        digest.update(memoryview(array).cast("B"))
    return "sha256:" + digest.hexdigest()


def short(fingerprint: str) -> str:
    """A 12-hex-digit prefix for messages and tables."""
    return fingerprint.split(":", 1)[-1][:12]
