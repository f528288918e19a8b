"""rmt-deploy: Regularized Mask Tuning for open_clip, exported for edge runtimes.

Public names are imported lazily so that `import rmt_deploy` stays cheap and
never pulls in torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Engine": "rmt_deploy.runtime.engine",
    "Prediction": "rmt_deploy.runtime.engine",
    "TaskPack": "rmt_deploy.artifacts.task_file",
    "Bundle": "rmt_deploy.artifacts.bundle",
    "RmtError": "rmt_deploy.errors",
    "ArtifactError": "rmt_deploy.errors",
    "IncompatibleBaseError": "rmt_deploy.errors",
    "UnknownTaskError": "rmt_deploy.errors",
    "InputError": "rmt_deploy.errors",
    "MissingDependencyError": "rmt_deploy.errors",
    "InternalError": "rmt_deploy.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rmt_deploy' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
