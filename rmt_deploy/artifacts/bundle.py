"""Bundle: the directory that export writes and the runtime reads.

    bundle/
      manifest.json            rmt_deploy.artifacts.manifest.Manifest (schema-checked)
      base.onnx (+ .data)      shared graph; masked weights are named graph inputs
      base_weights.safetensors the masked tensors' base values
      base.<gpu>.plan          optional refittable TensorRT engine
      tasks/<task>.rmtask      TaskPacks
      folded/<task>.onnx       optional self-contained per-task models (image -> logits)

A bundle is untrusted: every path is confined to the root, and every file is checked
against the size and sha256 the manifest records, by whoever reads it. numpy only.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from rmt_deploy.artifacts.integrity import REBUILD, FileRecord, confine, file_sha256, read_regular_file
from rmt_deploy.artifacts.manifest import (
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    Manifest,
    MaskedTensor,
    Preprocess,
    UnverifiedBundleWarning,
)
from rmt_deploy.artifacts.staging import write_atomic
from rmt_deploy.artifacts.task_file import SUFFIX, EncodedTask, TaskPack, read_encoded
from rmt_deploy.errors import ArtifactError, UnknownTaskError

__all__ = ["Bundle", "Manifest", "MaskedTensor", "Preprocess", "BUNDLE_FORMAT", "BUNDLE_VERSION", "MANIFEST",
           "TASKS_DIR", "FOLDED_DIR", "FOLDED_TASK_KEY", "UnverifiedBundleWarning", "file_sha256", "record_files"]

MANIFEST = "manifest.json"
TASKS_DIR = "tasks"
FOLDED_DIR = "folded"
FOLDED_TASK_KEY = "rmt_deploy.task"  # ONNX metadata of a folded model: the task it was built for
MAX_MANIFEST_BYTES = 64 << 20

# The graphs' tensor names, part of the bundle contract: base.onnx maps IMAGE_INPUT (and the masked
# weights) to EMBEDDING_OUTPUT; a folded model maps IMAGE_INPUT to LOGITS_OUTPUT.
IMAGE_INPUT = "image"
EMBEDDING_OUTPUT = "embedding"
LOGITS_OUTPUT = "logits"


class Bundle:
    """A bundle directory on disk: its validated manifest, confined files and task packs."""

    def __init__(self, root: str | os.PathLike, manifest: Manifest):
        self.root = Path(root)
        self.manifest = manifest

    @classmethod
    def open(cls, root: str | os.PathLike) -> "Bundle":
        """Read manifest.json and validate it against its schema; ArtifactError naming the bad field."""
        root = Path(root)
        path = root / MANIFEST
        if not root.is_dir():
            raise ArtifactError(f"{root}: no such bundle directory (create one with `rmt-deploy export`)")
        if not path.exists():
            raise ArtifactError(f"{root}: not a bundle (no {MANIFEST}); create one with `rmt-deploy export`")
        try:
            data = json.loads(read_regular_file(path, MAX_MANIFEST_BYTES, "manifest (JSON)"))
        except (ValueError, RecursionError) as exc:
            raise ArtifactError(f"{path}: not valid JSON ({type(exc).__name__}); {REBUILD}") from None
        except OSError as exc:
            raise ArtifactError(f"{path}: cannot read it ({exc.strerror})") from None
        try:
            manifest = Manifest.from_dict(data)
        except ArtifactError as exc:
            raise ArtifactError(f"{path}: {exc}") from None
        bundle = cls(root, manifest)
        for role, relative in manifest.named_files().items():
            if not role.startswith("tasks."):  # task paths are checked when a task is read
                confine(root, relative, f"{path}: {role}")
        return bundle

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest.tasks)

    @property
    def verified(self) -> bool:
        """Whether the manifest records sizes and hashes of its files (False for format-1 bundles)."""
        return self.manifest.verified

    def record(self, relative: str) -> FileRecord | None:
        """The manifest's size and sha256 of a file, or None in an unverified (format-1) bundle."""
        if not self.manifest.verified:
            return None
        found = self.manifest.checksums.get(relative)
        if found is None:
            raise ArtifactError(f"{self.root / MANIFEST}: no checksum for {relative}; {REBUILD}")
        return found

    def file(self, relative: str) -> Path:
        """The confined real path of a bundle file; ArtifactError if it is missing or outside the bundle."""
        path = confine(self.root, relative, f"bundle {self.root}")
        if not path.is_file():
            raise ArtifactError(f"{self.root / relative}: bundle file missing; {REBUILD}")
        return path

    def task_path(self, task: str) -> Path:
        """Relative-path-checked location of a task's .rmtask; UnknownTaskError lists the available tasks."""
        if task not in self.manifest.tasks:
            raise UnknownTaskError(
                f"task {task!r} not in bundle {self.root} (available: {', '.join(self.tasks) or 'none'})"
            )
        return self.file(self.task_relative(task))

    @staticmethod
    def task_relative(task: str) -> str:
        return f"{TASKS_DIR}/{task}{SUFFIX}"

    def read_task(self, task: str) -> EncodedTask:
        """A task file read once: hash checked against the manifest, internal name equal to `task`."""
        path = self.task_path(task)
        return read_encoded(path, record=self.record(self.task_relative(task)), expected_name=task)

    def load_task(self, task: str) -> TaskPack:
        """Load a task pack (decoded masks), verified and checked against the bundle's base fingerprint."""
        relative = self.task_relative(task)
        pack = TaskPack.load(self.task_path(task), record=self.record(relative), expected_name=task)
        pack.check_base(self.manifest.fingerprint)
        return pack

    def folded_path(self, task: str, backend: str = "onnx") -> Path:
        """Path of a task's folded model for a backend, if the bundle has one."""
        self.task_path(task)
        folded = self.manifest.files.get(backend, {}).get("folded", {})
        if task not in folded:
            raise ArtifactError(f"bundle {self.root} has no folded {backend} model for task {task!r}; "
                                "export with --mode folded or both")
        return self.file(folded[task])

    def folded_relative(self, task: str, backend: str = "onnx") -> str:
        self.folded_path(task, backend)
        return self.manifest.files[backend]["folded"][task]

    def verify(self) -> Iterator[tuple[str, str | None]]:
        """Check every recorded file's size and sha256: yields (relative path, None or the error)."""
        if not self.manifest.verified:
            raise ArtifactError(f"{self.root}: this bundle records no file hashes (bundle format 1); {REBUILD}")
        for relative, expected in self.manifest.checksums.items():
            try:
                path = self.file(relative)
                expected.check(path, path.stat().st_size, file_sha256(path))
                yield relative, None
            except ArtifactError as exc:
                yield relative, str(exc)

    def write_manifest(self) -> None:
        """Write manifest.json atomically."""
        write_atomic(self.root / MANIFEST, self.manifest.to_json().encode())


def record_files(root: Path) -> dict[str, FileRecord]:
    """Size and sha256 of every file under `root` except the manifest and hidden files, for the manifest."""
    records = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_file() and relative != MANIFEST and not any(p.startswith(".") for p in relative.split("/")):
            records[relative] = FileRecord(path.stat().st_size, file_sha256(path))
    return records

