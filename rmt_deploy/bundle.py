"""Bundle: the directory that export writes and the runtime reads.

    bundle/
      manifest.json            this module's Manifest
      base.onnx (+ .data)      shared graph; masked weights are named graph inputs
      base.<gpu>.plan          optional refittable TensorRT engine
      tasks/<task>.rmtask      TaskPacks
      folded/<task>.onnx       optional self-contained per-task models (image -> logits)

numpy only: no torch, no onnx needed to read a bundle.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rmt_deploy.errors import ArtifactError, UnknownTaskError, check_format
from rmt_deploy.taskpack import SUFFIX, TaskPack, write_atomic

MANIFEST = "manifest.json"
TASKS_DIR = "tasks"
FOLDED_DIR = "folded"
BUNDLE_FORMAT = "rmt-deploy.bundle"
BUNDLE_VERSION = 1


@dataclass
class MaskedTensor:
    """A weight that tasks mask: its open_clip name and its graph input name."""

    name: str
    shape: list[int]
    dtype: str
    input_name: str


@dataclass
class Preprocess:
    """open_clip's eval transform settings for this base."""

    image_size: list[int]
    mean: list[float]
    std: list[float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"


@dataclass
class Manifest:
    """Everything the runtime needs to know about a bundle, stored as manifest.json.

    `output_kind` "embedding": base.onnx returns L2-normalised image embeddings
    (output `output_name`), and logits = logit_scale * embedding @ head.T per task.
    `files` maps backend -> {"base": path, "folded": {task: path}, ...}.
    `tensorrt` holds engine metadata (GPU, TensorRT version, refit map) when built.
    `masked_inputs` / `base_weights` say where the masked tensors' base values live;
    `base_weights_sha256` is the sha256 of that file's bytes ("" in bundles written before it).
    """

    model_name: str
    pretrained: str | None
    fingerprint: str
    preprocess: Preprocess
    masked_tensors: list[MaskedTensor]
    embed_dim: int
    tasks: list[str]
    files: dict[str, Any]
    input_name: str = "image"
    output_name: str = "embedding"
    output_kind: str = "embedding"
    max_batch: int = 64
    precision: str = "fp32"
    tensorrt: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    # how base.onnx takes the masked weights: "required" = plain inputs the runtime always feeds,
    # base values in `base_weights`; "defaults" = inputs with initializer defaults (base values)
    masked_inputs: str = "required"
    base_weights: str = ""  # safetensors file: open_clip name -> base value, in the graph input's dtype
    base_weights_sha256: str = ""  # hex sha256 of the base_weights file, checked by the runtime at load
    quick_gelu: bool = False  # the base's activation (OpenAI CLIP weights: QuickGELU); runtimes rebuild it
    format: str = BUNDLE_FORMAT
    version: int = BUNDLE_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        check_format(data, BUNDLE_FORMAT, BUNDLE_VERSION, "manifest", "re-export the bundle or upgrade rmt-deploy")
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in known}
        values["preprocess"] = Preprocess(**values["preprocess"])
        values["masked_tensors"] = [MaskedTensor(**t) for t in values["masked_tensors"]]
        return cls(**values)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in chunks (never the whole file in memory)."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb") as handle:
        while True:
            count = handle.readinto(buffer)
            if not count:
                return digest.hexdigest()
            digest.update(view[:count])


class Bundle:
    """A bundle directory on disk: its manifest, files and task packs."""

    def __init__(self, root: str | os.PathLike, manifest: Manifest):
        self.root = Path(root)
        self.manifest = manifest

    @classmethod
    def open(cls, root: str | os.PathLike) -> "Bundle":
        """Read and validate manifest.json; raise ArtifactError if it is missing or malformed."""
        root = Path(root)
        path = root / MANIFEST
        if not root.is_dir():
            raise ArtifactError(f"{root}: no such bundle directory (create one with `rmt-deploy export`)")
        if not path.is_file():
            raise ArtifactError(f"{root}: not a bundle (no {MANIFEST}); create one with `rmt-deploy export`")
        try:
            manifest = Manifest.from_dict(json.loads(path.read_text()))
        except ArtifactError as exc:
            raise ArtifactError(f"{path}: {exc}") from None
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ArtifactError(f"{path}: malformed manifest ({type(exc).__name__}: {exc})") from None
        return cls(root, manifest)

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest.tasks)

    def task_path(self, task: str) -> Path:
        """Path of a task's .rmtask; UnknownTaskError lists the available tasks."""
        if task not in self.manifest.tasks:
            raise UnknownTaskError(
                f"task {task!r} not in bundle {self.root} (available: {', '.join(self.tasks) or 'none'})"
            )
        return self.root / TASKS_DIR / f"{task}{SUFFIX}"

    def load_task(self, task: str) -> TaskPack:
        """Load a task pack and check it against the bundle's base fingerprint."""
        pack = TaskPack.load(self.task_path(task))
        pack.check_base(self.manifest.fingerprint)
        return pack

    def file(self, relative: str) -> Path:
        """Absolute path of a bundle file; ArtifactError if it is missing."""
        path = self.root / relative
        if not path.is_file():
            raise ArtifactError(f"{path}: bundle file missing; re-export the bundle")
        return path

    def folded_path(self, task: str, backend: str = "onnx") -> Path:
        """Path of a task's folded model for a backend, if the bundle has one."""
        self.task_path(task)
        folded = self.manifest.files.get(backend, {}).get("folded", {})
        if task not in folded:
            raise ArtifactError(f"bundle {self.root} has no folded {backend} model for task {task!r}; "
                                "export with --mode folded or both")
        return self.file(folded[task])

    def write_manifest(self) -> None:
        """Write manifest.json atomically."""
        write_atomic(self.root / MANIFEST, self.manifest.to_json().encode())
