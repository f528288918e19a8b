"""Export fixtures: two task packs on the tiny base and one shared+folded bundle built from them."""
from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

TINY_MODEL = "rmt-tiny-vit"


@pytest.fixture(scope="session")
def task_files(make_taskpack, tmp_path_factory) -> list[Path]:
    """alpha and beta: 5% and 20% zeros, 3 and 4 classes, saved as .rmtask files."""
    folder = tmp_path_factory.mktemp("tasks")
    alpha = make_taskpack("alpha", seed=1, zeros=0.05, classes=3).save(folder / "alpha.rmtask")
    beta = make_taskpack("beta", seed=2, zeros=0.20, classes=4).save(folder / "beta.rmtask")
    return [alpha, beta]


@pytest.fixture(scope="session")
def bundle_dir(tiny_checkpoint, task_files, tmp_path_factory) -> Path:
    """A verified fp32 bundle with base.onnx and folded models for alpha and beta."""
    pytest.importorskip("onnxruntime")
    from rmt_deploy.export import ExportConfig, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_bundle(ExportConfig(TINY_MODEL, str(tiny_checkpoint), task_files, out, mode="both"), progress=False)
    return out



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
