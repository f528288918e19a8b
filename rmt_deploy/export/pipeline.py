"""export_bundle: a base model plus TaskPacks -> a verified bundle directory, written atomically.

Everything is written into a hidden temporary directory next to `out` and swapped into
place at the end (artifacts.staging), so an interrupted export leaves the old bundle or
none; an existing `out` is locked (artifacts.writer_lock) before anything of it is read.
"""
from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from rmt_deploy.artifacts.bundle import (
    FOLDED_DIR,
    FOLDED_TASK_KEY,
    MANIFEST,
    TASKS_DIR,
    Bundle,
    Manifest,
    MaskedTensor,
    Preprocess,
    record_files,
)
from rmt_deploy.artifacts.fingerprint import short
from rmt_deploy.artifacts.heads import head_nbytes
from rmt_deploy.artifacts.staging import staged_folder
from rmt_deploy.artifacts.task_file import SUFFIX, TaskPack
from rmt_deploy.artifacts.writer_lock import lock_if_present
from rmt_deploy.errors import ArtifactError, IncompatibleBaseError, InputError
from rmt_deploy.export import DEFAULTS, ExportConfig, verify
from rmt_deploy.export import onnx as graphs
from rmt_deploy.export.report import ExportReport, TaskReport

BASE_ONNX = "base.onnx"
CONSTANT_ONNX = "base_constant.onnx"
BASE_WEIGHTS = "base_weights.safetensors"
_SCRATCH_SHARED = ".shared.onnx"  # the shared graph, kept only while folding (mode "folded")
_TOOLS = ("rmt-deploy", "torch", "open_clip_torch", "onnx", "onnxruntime", "onnxscript", "onnx_ir", "tensorrt")


@dataclass
class _Base:
    """The loaded base and everything derived from it that the export steps share."""

    model: Any
    packs: list[TaskPack]
    fingerprint: str
    values: dict[str, np.ndarray]  # open_clip name -> base value in the export dtype
    names: dict[str, str]          # open_clip name -> graph input name
    preprocess: Preprocess
    embed_dim: int
    quick_gelu: bool = False

    @property
    def torch_params(self) -> dict[str, Any]:
        return {name: self.model.get_parameter(name) for name in self.values}


def export_bundle(config: ExportConfig, progress: bool = True) -> ExportReport:
    """Export `config.task_paths` on the base into the bundle `config.out`; see ExportConfig."""
    started = time.perf_counter()
    config.validate()
    with lock_if_present(Path(config.out)):
        return _export(config, started, progress)


def _export(config: ExportConfig, started: float, progress: bool) -> ExportReport:
    _check_out(config.out, config.force)
    trt = None
    if config.target == "trt":
        from rmt_deploy.export.tensorrt import require_tensorrt

        trt = require_tensorrt()
    packs = _load_packs(config.task_paths)
    steps = _Progress(progress, total=4 + len(packs) * (config.mode != "shared") + (trt is not None))
    report = ExportReport(config.out, config.target, config.mode, config.precision)
    try:
        with steps.step("loading base model"):
            base = _load_base(config, packs)
        with staged_folder(config.out) as stage:
            _write_bundle(stage, base, config, steps, report, trt)
    finally:
        steps.close()
    report.seconds = time.perf_counter() - started
    return report


def _load_base(config: ExportConfig, packs: list[TaskPack]) -> _Base:
    from rmt_deploy.basemodel.loading import embed_dim as image_embed_dim
    from rmt_deploy.basemodel.loading import fingerprint, load_base, preprocess_config

    loaded = load_base(config.model_name, config.pretrained)
    params = _masked_params(loaded.model, packs, config.model_name)
    base_fp = fingerprint(config.model_name, params)
    embed_dim = image_embed_dim(loaded.model)
    _check_packs(packs, base_fp, params, embed_dim)
    _check_activation(packs, loaded.quick_gelu)
    dtype = np.float16 if config.fp16 else np.float32
    values = {name: p.detach().cpu().float().numpy().astype(dtype) for name, p in params.items()}
    return _Base(loaded.model, packs, base_fp, values, graphs.input_names(list(params)),
                 Preprocess(**preprocess_config(loaded.model)), embed_dim, loaded.quick_gelu)


def _check_activation(packs: list[TaskPack], quick_gelu: bool) -> None:
    """A pack trained with the other activation would be served through a graph it was not trained on."""
    for pack in packs:
        if pack.quick_gelu != quick_gelu:
            raise IncompatibleBaseError(
                f"task '{pack.name}' was trained with quick_gelu={pack.quick_gelu}, the base loads with "
                f"quick_gelu={quick_gelu}: export with the weights the task was trained on, or retrain it")


def _write_bundle(stage: Path, base: _Base, config: ExportConfig, steps: "_Progress", report: ExportReport,
                  trt: Any) -> None:
    """Every bundle file into `stage`: tasks, shared graph, folded models, engines, manifest; then verify."""
    _copy_tasks(base.packs, config.task_paths, stage)
    with steps.step("exporting the shared graph"):
        shared_model = graphs.export_shared(base.model.visual, list(base.values), base.preprocess.image_size,
                                            config.opset, config.max_batch, config.fp16)
    shared_path = stage / (BASE_ONNX if config.mode != "folded" else _SCRATCH_SHARED)
    files = _write_shared(shared_model, shared_path, base, config, stage)
    for pack in base.packs if config.mode != "shared" else []:
        with steps.step(f"folding task {pack.name}"):
            files.setdefault("folded", {})[pack.name] = _write_folded(shared_path, pack, base, stage)
    if config.verify:
        with steps.step("verifying against torch"):
            report.checks = _verify(stage, files, base, config)
    all_files, tensorrt_entry = {"onnx": files}, {}
    if trt is not None:
        with steps.step("building TensorRT engines"):
            from rmt_deploy.export.engines import build_bundle_engines

            all_files["tensorrt"], tensorrt_entry, trt_checks = build_bundle_engines(
                trt, stage, shared_model, files, base.packs, base.values, base.names, base.preprocess, config,
                base.model.visual if config.verify else None)
            report.checks += trt_checks
    for path in stage.glob(_SCRATCH_SHARED + "*"):
        path.unlink()
    with steps.step("writing manifest"):
        checksums = record_files(stage)
        base_sha = checksums[BASE_WEIGHTS].sha256 if config.mode != "folded" else ""
        manifest = _manifest(base, config, all_files, tensorrt_entry, base_sha)
        manifest.checksums = checksums
        Bundle(stage, manifest).write_manifest()
    report.files = _file_sizes(stage)
    report.tasks = _task_reports(report.files, base.packs, files)
    if config.verify:
        verify.raise_failures(report.checks)


def _manifest(base: _Base, config: ExportConfig, files: dict[str, Any], tensorrt_entry: dict[str, Any],
              base_sha: str) -> Manifest:
    return Manifest(
        model_name=config.model_name, pretrained=config.pretrained, fingerprint=base.fingerprint,
        preprocess=base.preprocess,
        masked_tensors=[MaskedTensor(n, list(v.shape), v.dtype.name, base.names[n]) for n, v in base.values.items()],
        embed_dim=base.embed_dim, tasks=[p.name for p in base.packs], files=files, max_batch=config.max_batch,
        precision=config.precision, tensorrt=tensorrt_entry, tools=_tool_versions(),
        masked_inputs=config.masked_inputs, base_weights=BASE_WEIGHTS if config.mode != "folded" else "",
        base_weights_sha256=base_sha, quick_gelu=base.quick_gelu,
    )


def _write_shared(model: Any, path: Path, base: _Base, config: ExportConfig, stage: Path) -> dict[str, Any]:
    """Save the shared graph (with defaults if asked) and, in shared modes, the base weights file."""
    from safetensors.numpy import save_file

    if config.masked_inputs == DEFAULTS:
        graphs.set_defaults(model, {base.names[n]: v for n, v in base.values.items()})
    graphs.save_model(model, path, {"rmt_deploy.masked_inputs": config.masked_inputs,
                                    "rmt_deploy.model": config.model_name})
    if config.mode == "folded":
        return {}
    save_file(dict(base.values), str(stage / BASE_WEIGHTS))
    if graphs.weight_bytes(model) > graphs.EXTERNAL_DATA_BYTES:
        return {"base": BASE_ONNX}  # its unmasked weights live in base.onnx.data: no second copy of them
    graphs.save_constant_graph(graphs.constant_graph(path, list(base.names.values())), stage / CONSTANT_ONNX,
                               {"rmt_deploy.model": config.model_name})
    return {"base": BASE_ONNX, "constant": CONSTANT_ONNX}


def _write_folded(shared_path: Path, pack: TaskPack, base: _Base, stage: Path) -> str:
    masked = {base.names[n]: value * pack.masks[n] for n, value in base.values.items()}
    model = graphs.fold_task(shared_path, masked, pack.head, pack.logit_scale, pack.cache)
    relative = f"{FOLDED_DIR}/{pack.name}.onnx"
    (stage / FOLDED_DIR).mkdir(exist_ok=True)
    graphs.save_model(model, stage / relative, {FOLDED_TASK_KEY: pack.name})
    return relative


def _verify(stage: Path, files: dict[str, Any], base: _Base, config: ExportConfig) -> list[verify.Check]:
    """onnx.checker on every graph; logits of ORT (shared fed per task, and folded) vs masked torch."""
    tolerance = verify.FP16_TOLERANCE if config.fp16 else verify.FP32_TOLERANCE
    images = verify.random_images(base.preprocess.image_size)
    names = base.names
    base32 = {n: p.detach().cpu().float().numpy() for n, p in base.torch_params.items()}
    shared = None
    if "base" in files:
        verify.check_onnx(stage / files["base"])
        shared = verify.session(stage / files["base"])
    checks = []
    for pack in base.packs:
        masked = {n: w * pack.masks[n] for n, w in base32.items()}
        reference = verify.logits(verify.torch_embeddings(base.model.visual, masked, images), pack)
        if shared is not None:
            dtype = np.float16 if config.fp16 else np.float32
            feeds = {names[n]: w.astype(dtype) for n, w in masked.items()}
            embedding = shared.run([graphs.EMBEDDING_OUTPUT], {graphs.IMAGE_INPUT: images, **feeds})[0]
            test = verify.logits(embedding, pack)
            checks.append(verify.compare(pack.name, "shared", reference, test, tolerance))
            if "constant" in files and pack is base.packs[0]:  # one task checks the task-independent graph
                constant = verify.session(stage / files["constant"], feeds)
                embedding = constant.run([graphs.EMBEDDING_OUTPUT], {graphs.IMAGE_INPUT: images})[0]
                checks.append(verify.compare(pack.name, "constant", reference, verify.logits(embedding, pack),
                                             tolerance))
        if pack.name in files.get("folded", {}):
            path = stage / files["folded"][pack.name]
            verify.check_onnx(path)
            test = verify.session(path).run([graphs.LOGITS_OUTPUT], {graphs.IMAGE_INPUT: images})[0]
            checks.append(verify.compare(pack.name, "folded", reference, test, tolerance))
    return checks


# ---- inputs ----

def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file: give a directory path for the bundle")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise InputError(f"--out {out} exists and is not empty: use --force to replace it, "
                             "or choose another path")
        if not (out / MANIFEST).is_file():
            raise InputError(f"--out {out} is not an rmt-deploy bundle (no {MANIFEST}): --force only "
                             "replaces bundles; remove it yourself or choose another path")


def _load_packs(paths: list[Path]) -> list[TaskPack]:
    if not paths:
        raise InputError("no task given: pass at least one --task FILE.rmtask")
    packs = [TaskPack.load(path) for path in paths]
    seen: dict[str, Path] = {}
    for pack, path in zip(packs, paths):
        if pack.name in seen:
            raise InputError(f"task name {pack.name!r} appears twice ({seen[pack.name]} and {path}): "
                             "a bundle holds each task once")
        seen[pack.name] = path
    return packs


def _masked_params(model: Any, packs: list[TaskPack], model_name: str) -> dict[str, Any]:
    """The base parameters the first pack masks, in model order."""
    params = dict(model.named_parameters())
    wanted = set(packs[0].masks)
    unknown = sorted(wanted - set(params))
    if unknown:
        raise IncompatibleBaseError(
            f"task '{packs[0].name}' masks {unknown[0]!r}, which {model_name} does not have: it was trained "
            f"on another base (fingerprint {short(packs[0].base_fingerprint)}, model {packs[0].model_name})"
        )
    return {name: p for name, p in params.items() if name in wanted}


def _check_packs(packs: list[TaskPack], base_fp: str, params: dict[str, Any], embed_dim: int) -> None:
    for pack in packs:
        pack.check_base(base_fp)
        for name, param in params.items():
            if pack.masks.get(name) is None or tuple(pack.masks[name].shape) != tuple(param.shape):
                raise ArtifactError(f"task '{pack.name}': mask {name!r} is missing or not shaped "
                                    f"{list(param.shape)}; the task file is inconsistent with its fingerprint")
        if pack.head.shape[1] != embed_dim:
            raise ArtifactError(f"task '{pack.name}': head is {list(pack.head.shape)}, "
                                f"the base embeds into {embed_dim} dimensions")


def _copy_tasks(packs: list[TaskPack], paths: list[Path], stage: Path) -> None:
    (stage / TASKS_DIR).mkdir()
    for pack, path in zip(packs, paths):
        shutil.copyfile(path, stage / TASKS_DIR / f"{pack.name}{SUFFIX}")


# ---- output ----

def _file_sizes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def _task_reports(sizes: dict[str, int], packs: list[TaskPack], files: dict[str, Any]) -> list[TaskReport]:
    base = sum(size for path, size in sizes.items() if path.startswith(BASE_ONNX) or path == BASE_WEIGHTS)
    reports = []
    for pack in packs:
        folded = files.get("folded", {}).get(pack.name)
        folded_bytes = None
        if folded is not None:
            folded_bytes = sum(size for path, size in sizes.items() if path.startswith(folded))
        rmtask = sizes[f"{TASKS_DIR}/{pack.name}{SUFFIX}"]
        reports.append(TaskReport(pack.name, rmtask, folded_bytes, base + head_nbytes(pack.head, pack.cache)))
    return reports


def _tool_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in _TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


class _Progress:
    """A tqdm bar over export steps, labelled with the current step (silent when disabled)."""

    def __init__(self, enabled: bool, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="export", unit="step", disable=not enabled, leave=False)

    @contextmanager
    def step(self, label: str) -> Iterator[None]:
        self.bar.set_description(label)
        yield
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
