"""Export fixtures: references independent of the export code (task_files and bundle_dir, the two
packs and their shared+folded bundle, live in tests/conftest.py)."""
from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest


def masked_torch_logits(visual, pack, images: np.ndarray) -> np.ndarray:
    """Reference independent of the export code: masks multiplied into a copy's parameters in place."""
    import torch

    model = copy.deepcopy(visual).eval()
    with torch.no_grad():
        for name, keep in pack.masks.items():
            model.get_parameter(name[len("visual."):]).data.mul_(torch.from_numpy(keep.astype(np.float32)))
        embedding = torch.nn.functional.normalize(model(torch.from_numpy(images)), dim=-1).numpy()
    return pack.logit_scale * embedding @ pack.head.T


def rel_l2(test: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(test, np.float64) - reference) / np.linalg.norm(reference))


def ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def refs() -> SimpleNamespace:
    """Reference helpers independent of rmt_deploy.export: masked torch logits, rel L2, ORT session."""
    return SimpleNamespace(masked_torch_logits=masked_torch_logits, rel_l2=rel_l2, ort_session=ort_session)
