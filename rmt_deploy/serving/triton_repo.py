"""Write a Triton model repository for a bundle: the Engine as a Python-backend model, folded tasks
as onnxruntime-backend models. Used by `rmt-deploy serve` (bundle referenced in place) and by
`rmt-deploy export --target triton` (bundle copied in, for the stock Triton container).

    REPO/<model>/config.pbtxt        backend "python"; inputs task, image, image_bytes; dynamic batching
    REPO/<model>/1/model.py          imports rmt_deploy.serving.triton_model (pip install 'rmt-deploy[onnx]')
    REPO/<model>/1/bundle/           the bundle (export; serve refers to the user's bundle in place)
    REPO/<task>/config.pbtxt         platform "onnxruntime_onnx"; input image FP32 [3, H, W] -> logits [C]
    REPO/<task>/1/model.onnx         the folded model; REPO/<task>/labels.txt its class names
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from rmt_deploy.artifacts.bundle import IMAGE_INPUT, LOGITS_OUTPUT, Bundle
from rmt_deploy.artifacts.staging import staged_folder
from rmt_deploy.artifacts.writer_lock import lock_if_present
from rmt_deploy.errors import InputError
from rmt_deploy.serving import protocol

if TYPE_CHECKING:
    from rmt_deploy.export import ExportConfig

MODEL_PY = '''"""Triton Python-backend model serving an rmt-deploy bundle; needs: pip install 'rmt-deploy[onnx]'."""
from rmt_deploy.serving.triton_model import TritonPythonModel  # noqa: F401
'''
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class ServingConfig:
    """What the Engine model serves and how Triton batches it."""

    model_name: str = "rmt"
    top_k: int = 5
    max_batch: int = 32
    max_queue_delay_us: int = 1000
    cache_tasks: int = 2
    threads: int | None = None
    backend: str = "auto"
    max_image_pixels: int = protocol.ImageLimits.max_pixels
    instances: int = 1  # Triton model instances: each a stub process with its own Engine (memory x N)

    def validate(self) -> None:
        """InputError naming the bad value."""
        if not _NAME.match(self.model_name):
            raise InputError(f"model name {self.model_name!r} must be 1-128 letters, digits, '_', '.', '-'")
        for label, value, low in (("top-k", self.top_k, 1), ("max batch", self.max_batch, 1),
                                  ("max queue delay", self.max_queue_delay_us, 0), ("cache tasks", self.cache_tasks, 1),
                                  ("max image pixels", self.max_image_pixels, 1), ("instances", self.instances, 1)):
            if not isinstance(value, int) or value < low:
                raise InputError(f"{label} {value!r} must be an integer >= {low}")


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _io(name: str, dtype: str, dims: list[int], extra: str = "") -> str:
    return f"  {{ name: {_quote(name)} data_type: {dtype} dims: [ {', '.join(map(str, dims))} ]{extra} }}"


def engine_config(config: ServingConfig, embed_dim: int, bundle_value: str) -> str:
    """config.pbtxt of the Python-backend model hosting the Engine."""
    params = {"bundle": bundle_value, "top_k": str(config.top_k), "cache_tasks": str(config.cache_tasks),
              "threads": "" if config.threads is None else str(config.threads), "backend": config.backend,
              "max_image_pixels": str(config.max_image_pixels)}
    inputs = [_io(protocol.TASK, "TYPE_STRING", [1], " optional: true"),
              _io(protocol.IMAGE, "TYPE_UINT8", [-1, -1, 3], " optional: true allow_ragged_batch: true"),
              _io(protocol.IMAGE_BYTES, "TYPE_STRING", [1], " optional: true")]
    outputs = [_io(protocol.LABELS, "TYPE_STRING", [config.top_k]), _io(protocol.PROBS, "TYPE_FP32", [config.top_k]),
               _io(protocol.INDEX, "TYPE_INT64", [1]), _io(protocol.EMBEDDING, "TYPE_FP32", [embed_dim])]
    parameters = "\n".join(f"parameters: {{ key: {_quote(k)} value: {{ string_value: {_quote(v)} }} }}"
                           for k, v in params.items())
    sep = ",\n"
    return (f"name: {_quote(config.model_name)}\nbackend: \"python\"\nmax_batch_size: {config.max_batch}\n"
            f"dynamic_batching {{ max_queue_delay_microseconds: {config.max_queue_delay_us} }}\n"
            f"input [\n{sep.join(inputs)}\n]\noutput [\n{sep.join(outputs)}\n]\n"
            f"instance_group [ {{ kind: KIND_CPU count: {config.instances} }} ]\n{parameters}\n")


def folded_config(task: str, input_name: str, output_name: str, image_size: tuple[int, int], classes: int,
                  max_batch: int, max_queue_delay_us: int) -> str:
    """config.pbtxt of one folded task on Triton's onnxruntime backend (preprocessed FP32 images -> logits)."""
    label = ' label_filename: "labels.txt"'
    return (f"name: {_quote(task)}\nplatform: \"onnxruntime_onnx\"\nmax_batch_size: {max_batch}\n"
            f"dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us} }}\n"
            f"input [\n{_io(input_name, 'TYPE_FP32', [3, *image_size])}\n]\n"
            f"output [\n{_io(output_name, 'TYPE_FP32', [classes], label)}\n]\n"
            f"instance_group [ {{ kind: KIND_CPU count: 1 }} ]\n")


def write_engine_model(repo: Path, bundle: Bundle, config: ServingConfig) -> Path:
    """REPO/<model>/: config.pbtxt and 1/model.py; the bundle is referenced relative to 1/ when it lies
    there (an exported repository), else by its absolute path (serve)."""
    config.validate()
    version = repo / config.model_name / "1"
    version.mkdir(parents=True, exist_ok=True)
    (version / "model.py").write_text(MODEL_PY)
    root = Path(bundle.root).resolve()
    value = str(root.relative_to(version.resolve())) if root.is_relative_to(version.resolve()) else str(root)
    text = engine_config(config, int(bundle.manifest.embed_dim), value)
    (repo / config.model_name / "config.pbtxt").write_text(text)
    return repo / config.model_name


def write_folded_models(repo: Path, bundle: Bundle, config: ServingConfig) -> list[str]:
    """REPO/<task>/ for every task with a folded ONNX model; returns the task names written."""
    written = []
    size = _image_size(bundle)
    for task in bundle.tasks:
        if task == config.model_name:
            raise InputError(f"task {task!r} has the Engine model's name; pick another --model-name")
        source = bundle.folded_path(task)
        version = repo / task / "1"
        version.mkdir(parents=True, exist_ok=True)
        _link_or_copy(source, version / "model.onnx")
        classes = bundle.load_task(task).class_names
        (repo / task / "labels.txt").write_text("".join(f"{c}\n" for c in classes))
        (repo / task / "config.pbtxt").write_text(
            folded_config(task, IMAGE_INPUT, LOGITS_OUTPUT, size, len(classes), config.max_batch,
                          config.max_queue_delay_us))
        written.append(task)
    return written


def _image_size(bundle: Bundle) -> tuple[int, int]:
    size = bundle.manifest.preprocess.image_size
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def export_repository(export: "ExportConfig", config: ServingConfig, progress: bool = True) -> list[str]:
    """`rmt-deploy export --target triton`: an ONNX bundle exported into REPO/<model>/1/bundle, its Engine
    model, and with mode folded/both the folded tasks as onnxruntime models; written to a temporary
    folder beside REPO and renamed into place. Returns the model names."""
    config.validate()
    out = Path(export.out)
    with lock_if_present(out), lock_if_present(out / config.model_name / "1" / "bundle"):
        if out.exists() and not export.force:
            raise InputError(f"{out} already exists; pass --force to replace it")
        return _export_repository(export, config, out, progress)


def _export_repository(export: "ExportConfig", config: ServingConfig, out: Path, progress: bool) -> list[str]:
    from rmt_deploy.export import export_bundle

    with staged_folder(out) as staging:
        folded = export.mode in ("folded", "both")
        bundle_dir = staging / config.model_name / "1" / "bundle"
        bundle_dir.parent.mkdir(parents=True)
        export_bundle(replace(export, out=bundle_dir, target="onnx", mode="both" if folded else "shared",
                              force=False), progress=progress)
        bundle = Bundle.open(bundle_dir)
        write_engine_model(staging, bundle, config)
        models = [config.model_name] + (write_folded_models(staging, bundle, config) if folded else [])
    return models
