"""The inputs the runtime checks share, built once per run in the work folder: a seeded random base
saved as a checkpoint (the path a user's weights take), two tasks on it at the paper's sparsity, and
bundles holding them. Each is written under a name that says what it is and reused when present,
so each check stays independent (it builds what it needs) without paying twice."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

TASKS = (("alpha", 47), ("beta", 10))  # name, classes (a DTD-sized head and a EuroSAT-sized one)
ZEROS = 0.025                           # dropped weights per task: the paper reports 2.56%


def checkpoint(work: Path, model: str) -> Path:
    """A random `model` (torch seed 0) saved as .safetensors."""
    path = work / f"{model}.safetensors"
    if path.is_file():
        return path
    import torch

    from rmt_deploy.basemodel.loading import load_base, save_checkpoint

    torch.manual_seed(0)
    base = load_base(model, None)
    tmp = work / f".{model}.partial.safetensors"
    save_checkpoint(base.model, tmp)
    tmp.rename(path)
    return path


def packs(work: Path, model: str) -> list[Path]:
    """The tasks' .rmtask files: i.i.d. masks with ZEROS dropped, random unit heads."""
    folder = work / f"{model}-tasks"
    paths = [folder / f"{name}.rmtask" for name, _ in TASKS]
    if all(p.is_file() for p in paths):
        return paths
    from rmt_deploy.artifacts.task_file import TaskPack
    from rmt_deploy.basemodel.loading import fingerprint, load_base, maskable_tensors

    base = load_base(model, str(checkpoint(work, model)))
    tensors = maskable_tensors(base.model)
    base_fp = fingerprint(model, tensors)
    embed_dim = int(base.model.visual.output_dim)
    folder.mkdir(parents=True, exist_ok=True)
    for seed, ((name, classes), path) in enumerate(zip(TASKS, paths)):
        rng = np.random.default_rng(seed)
        masks = {n: rng.random(tuple(t.shape), dtype=np.float32) >= ZEROS for n, t in tensors.items()}
        head = rng.standard_normal((classes, embed_dim)).astype(np.float32)
        head /= np.linalg.norm(head, axis=1, keepdims=True)
        TaskPack(name=name, class_names=[f"class {i}" for i in range(classes)], head=head, masks=masks,
                 base_fingerprint=base_fp, model_name=model, logit_scale=100.0,
                 template="a photo of a {}.").save(path)
    return paths


def torch_bundle(work: Path, model: str, max_batch: int = 32) -> Path:
    """A bundle with a manifest and the tasks but no ONNX (what the torch backend reads), built the way
    tests/conftest.py's torch_bundle fixture builds one: no export needed."""
    root = work / f"{model}-torch-bundle"
    if (root / "manifest.json").is_file():
        return root
    from rmt_deploy.artifacts.bundle import Manifest, MaskedTensor, Preprocess, record_files
    from rmt_deploy.basemodel.loading import fingerprint, load_base, maskable_tensors, preprocess_config

    ckpt, task_files = checkpoint(work, model), packs(work, model)
    base = load_base(model, str(ckpt))
    tensors = maskable_tensors(base.model)
    stage = work / f".{model}-torch-bundle.partial"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "tasks").mkdir(parents=True)
    for path in task_files:
        shutil.copyfile(path, stage / "tasks" / path.name)
    manifest = Manifest(
        model_name=model, pretrained=str(ckpt), fingerprint=fingerprint(model, tensors),
        preprocess=Preprocess(**preprocess_config(base.model)),
        masked_tensors=[MaskedTensor(n, list(t.shape), "float32", n.replace(".", "_")) for n, t in tensors.items()],
        embed_dim=int(base.model.visual.output_dim), tasks=[p.stem for p in task_files], files={},
        max_batch=max_batch, quick_gelu=base.quick_gelu,
    )
    manifest.checksums = record_files(stage)
    (stage / "manifest.json").write_text(manifest.to_json())
    stage.rename(root)
    return root


def exported_bundle(work: Path, model: str, target: str = "onnx", max_batch: int = 32) -> tuple[Path, Any]:
    """A bundle written by the library's export (shared + folded, verified against torch); returns it
    with the ExportReport (None when it was already there)."""
    root = work / f"{model}-{target}-bundle"
    if (root / "manifest.json").is_file():
        return root, None
    from rmt_deploy.export import ExportConfig, export_bundle

    report = export_bundle(ExportConfig(model, str(checkpoint(work, model)), packs(work, model), root,
                                        target=target, mode="both", max_batch=max_batch), progress=False)
    return root, report


def input_batch(model_image_size: Any, n: int, seed: int = 7) -> np.ndarray:
    """A float32 NCHW batch of preprocessed-looking random images."""
    size = model_image_size if isinstance(model_image_size, (list, tuple)) else (model_image_size,) * 2
    return np.random.default_rng(seed).standard_normal((n, 3, *size)).astype(np.float32)


def masked_nbytes(bundle_root: Path) -> tuple[int, int]:
    """(masked weights, their fp32 bytes) as the bundle's manifest lists them."""
    from rmt_deploy.artifacts.bundle import Bundle

    tensors = Bundle.open(bundle_root).manifest.masked_tensors
    count = int(sum(int(np.prod(t.shape)) for t in tensors))
    return count, 4 * count


def export_figures(report: Any) -> dict[str, Any]:
    """What an ExportReport says about its verification (nothing when the bundle was reused)."""
    if report is None:
        return {"export": "reused from an earlier check of this run"}
    return {"export_seconds": report.seconds, "export_checks": [
        {"task": c.task, "kind": c.kind, "rel_l2": float(c.rel_l2), "top1": float(c.top1), "ok": c.ok}
        for c in report.checks]}
