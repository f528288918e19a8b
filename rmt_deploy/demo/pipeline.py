"""The whole pipeline on an embedded default: base, tasks, training, export, serving, bench.

No network: the base is a small open_clip ViT with seeded random weights, saved
as a local checkpoint and loaded back through the path a user's checkpoint takes;
the tasks are real images that ship inside scikit-image and scikit-learn.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rmt_deploy.artifacts.staging import staged_folder
from rmt_deploy.demo.datasets import DemoTask, build_digits, build_textures
from rmt_deploy.errors import InputError, require


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo run; `fast()` is the variant the test suite runs."""

    model: str = "rmt-tiny-vit"
    shots: int = 16
    test_per_class: int = 30
    epochs: int = 30
    # The paper's 8e-5 suits a pretrained ViT-B/16 and thousands of steps; the demo's
    # random-weight model gets ~100 steps per task, so scores need a larger step to cross
    # the threshold within the demo's epochs.
    lr: float = 1e-3
    batch_size: int = 16
    bench_repeats: int = 20
    bench_memory: bool = True
    seed: int = 0

    @classmethod
    def fast(cls) -> "DemoConfig":
        return cls(model="rmt-tiny-vit", shots=4, test_per_class=6, epochs=2, bench_repeats=3, bench_memory=False)


def _build_base(config: DemoConfig, folder: Path) -> Path:
    """Seeded random weights for the demo model, saved as a local checkpoint file."""
    torch = require("torch", "train")
    from rmt_deploy.basemodel.loading import load_base, save_checkpoint

    torch.manual_seed(config.seed)
    folder.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(load_base(config.model, None).model, folder / f"{config.model}-seed{config.seed}.safetensors")


def _train(config: DemoConfig, task: DemoTask, checkpoint: Path, out: Path) -> dict[str, Any]:
    from rmt_deploy.training.trainer import TrainConfig, train_task

    train_config = TrainConfig(model=config.model, dataset="imagefolder", data_root=str(task.root), out=str(out),
                               pretrained=str(checkpoint), task=task.name, template=task.template,
                               shots=config.shots, seed=1, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                               device="cpu", workers=0, progress=False)
    result = train_task(train_config)
    return {"taskpack": str(result.taskpack), **result.metrics}


def _export(config: DemoConfig, checkpoint: Path, packs: list[Path], out: Path) -> dict[str, Any]:
    from rmt_deploy.export import ExportConfig, export_bundle

    report = export_bundle(ExportConfig(config.model, str(checkpoint), packs, out, mode="both"), progress=False)
    return {"files": report.files, "seconds": report.seconds,
            "checks": [{**asdict(c), "passed": c.ok} for c in report.checks]}


def _serve(bundle: Path, tasks: list[DemoTask]) -> dict[str, Any]:
    """Predict every held-out image of each task through one Engine, switching between tasks."""
    from rmt_deploy.runtime.engine import Engine

    results: dict[str, Any] = {}
    with Engine.load(bundle, cache_tasks=1) as engine:
        switch_ms = []
        for task in tasks:
            start = time.perf_counter()
            engine.switch(task.name)
            switch_ms.append((time.perf_counter() - start) * 1e3)
            paths, truth = [], []
            for name in task.class_names:
                files = sorted((task.root / "test" / name).glob("*.png"))
                paths += files
                truth += [name] * len(files)
            prediction = engine.predict(paths)
            example = prediction.top_k(1)[0][0]
            results[task.name] = {
                "images": len(paths),
                "accuracy": float(np.mean(np.asarray(prediction.labels) == np.asarray(truth))),
                "example": {"file": paths[0].name, "label": example[0], "probability": example[1]},
            }
        results["backend"] = engine.backend
        results["uncached_switch_ms"] = switch_ms
    return results


def _bench(config: DemoConfig, bundle: Path) -> dict[str, Any]:
    from rmt_deploy.bench.suite import BenchConfig, run_bench

    return run_bench(BenchConfig(bundle, batch_sizes=[1, 8], repeats=config.bench_repeats,
                                 memory=config.bench_memory), progress=False)


def run_demo(config: DemoConfig, out: Path, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every stage into a fresh folder, then move it to `out`; return the report data."""
    from rmt_deploy.demo.report import write_report

    out = Path(out)
    if out.exists() and not (out / "report.json").exists() and any(out.iterdir()):
        raise InputError(f"--out {out} exists and is not a demo folder: choose an empty or new folder")
    with staged_folder(out) as stage:
        report = _run_stages(config, stage, say)
        write_report(report, stage)
    _point_bundle_at_checkpoint(out / "bundle", out / report["checkpoint"])
    report["out"] = str(out)
    return report


def _point_bundle_at_checkpoint(bundle_dir: Path, checkpoint: Path) -> None:
    """The bundle recorded the checkpoint's staging path; record where it now lies."""
    from rmt_deploy.artifacts.bundle import Bundle

    bundle = Bundle.open(bundle_dir)
    bundle.manifest.pretrained = str(checkpoint.resolve())
    bundle.write_manifest()


def _run_stages(config: DemoConfig, stage: Path, say: Callable[[str], None]) -> dict[str, Any]:
    timings: dict[str, float] = {}
    start = time.perf_counter()
    say(f"[1/6] base model {config.model}: seeded random weights (no pretrained CLIP can be downloaded offline)")
    checkpoint = _build_base(config, stage / "base")
    say("[2/6] tasks from real images: textures (scikit-image brick/grass/gravel), digits (scikit-learn)")
    tasks = [build_textures(stage / "data" / "textures", config.shots, config.test_per_class, config.seed),
             build_digits(stage / "data" / "digits", config.shots, config.test_per_class, config.seed)]
    timings["data_s"] = time.perf_counter() - start
    training = {}
    for i, task in enumerate(tasks, 1):
        say(f"[3/6] training masks for '{task.name}' ({len(task.class_names)} classes, {config.shots} shots, "
            f"{config.epochs} epochs) [{i}/{len(tasks)}]")
        begin = time.perf_counter()
        training[task.name] = _train(config, task, checkpoint, stage / "train" / task.name)
        timings[f"train_{task.name}_s"] = time.perf_counter() - begin
    say("[4/6] exporting a shared ONNX bundle and folded per-task models")
    begin = time.perf_counter()
    export = _export(config, checkpoint, [Path(training[t.name]["taskpack"]) for t in tasks], stage / "bundle")
    timings["export_s"] = time.perf_counter() - begin
    say("[5/6] serving held-out images through one Engine, switching tasks")
    serving = _serve(stage / "bundle", tasks)
    say("[6/6] benchmarking the bundle")
    begin = time.perf_counter()
    bench = _bench(config, stage / "bundle")
    timings["bench_s"] = time.perf_counter() - begin
    timings["total_s"] = time.perf_counter() - start
    return {"config": asdict(config), "checkpoint": str(checkpoint.relative_to(stage)),
            "tasks": {t.name: {"classes": t.class_names, "template": t.template} for t in tasks},
            "training": training, "export": export, "serving": serving, "bench": bench, "timings": timings}
