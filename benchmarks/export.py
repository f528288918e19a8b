"""Export benchmark: ViT-B-16 (random weights, CPU) with two tasks at the paper's sparsity.

Measures export time, base.onnx size, and each task's .rmtask size against its
folded model. Writes benchmarks/results/export.json and export.txt.

    .venv/bin/python benchmarks/export.py [--model ViT-B-16] [--fp16] [--zeros 0.025]
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def make_packs(model_name: str, seed: int, zeros: float, folder: Path) -> list[Path]:
    """Two TaskPacks with i.i.d. masks (`zeros` fraction dropped) and random unit heads."""
    import torch

    from rmt_deploy.artifacts.task_file import TaskPack
    from rmt_deploy.basemodel.loading import fingerprint, load_base, maskable_tensors

    torch.manual_seed(seed)
    base = load_base(model_name, None)
    tensors = maskable_tensors(base.model)
    base_fp = fingerprint(model_name, tensors)
    embed_dim = base.model.visual.output_dim
    paths = []
    for index, (name, classes) in enumerate((("dtd", 47), ("eurosat", 10))):
        rng = np.random.default_rng(index)
        masks = {n: rng.random(tuple(t.shape)) >= zeros for n, t in tensors.items()}
        head = rng.standard_normal((classes, embed_dim)).astype(np.float32)
        head /= np.linalg.norm(head, axis=1, keepdims=True)
        pack = TaskPack(name=name, class_names=[f"class {i}" for i in range(classes)], head=head, masks=masks,
                        base_fingerprint=base_fp, model_name=model_name)
        paths.append(pack.save(folder / f"{name}.rmtask"))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--zeros", type=float, default=0.025)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import onnxruntime
    import torch

    from rmt_deploy.export import ExportConfig, export_bundle

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = make_packs(args.model, args.seed, args.zeros, folder)
        torch.manual_seed(args.seed)  # export_bundle's load_base draws the same random weights
        started = time.perf_counter()
        report = export_bundle(ExportConfig(args.model, None, paths, folder / "bundle", mode="both",
                                            fp16=args.fp16), progress=True)
        seconds = time.perf_counter() - started
    result = {
        "model": args.model,
        "weights": f"random (torch.manual_seed({args.seed}))",
        "precision": report.precision,
        "mask_zeros": args.zeros,
        "export_seconds": round(seconds, 1),
        "files_bytes": report.files,
        "base_onnx_bytes": sum(v for k, v in report.files.items() if k.startswith("base.onnx")),
        "base_weights_bytes": report.files.get("base_weights.safetensors", 0),
        "tasks": {t.name: {"rmtask_bytes": t.rmtask_bytes, "folded_bytes": t.folded_bytes,
                           "folded_over_rmtask": round(t.storage_ratio, 1)} for t in report.tasks},
        "verification": [{"task": c.task, "kind": c.kind, "rel_l2": c.rel_l2, "top1": c.top1,
                          "tolerance": c.tolerance} for c in report.checks],
        "machine": {"cpu_count": __import__("os").cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "-fp16" if args.fp16 else ""
    (RESULTS / f"export{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"export{suffix}.txt").write_text(report.table() + "\n")
    print(report.table())


if __name__ == "__main__":
    main()
