"""The bundle manifest (manifest.json): its dataclasses and its versioned schema (numpy-free).

A manifest is untrusted input. `Manifest.from_dict` checks it against the schema of its
format version before anything else reads it: every field's type, range and length,
every path's form, names that become file names, and the cross-field rules (unique
names, a record for every file). Unknown keys are ignored with a warning; a newer
version is refused. Version 1 (no file records) still loads, with a
warning that its files cannot be verified.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Callable

from rmt_deploy.artifacts.integrity import REBUILD, FileRecord, relative_path
from rmt_deploy.artifacts.task_file import check_task_name
from rmt_deploy.errors import ArtifactError

BUNDLE_FORMAT = "rmt-deploy.bundle"
BUNDLE_VERSION = 3  # 3: files.onnx.constant (the shared graph with its masked weights as supplied constants)
HASHED_VERSION = 2  # the first version that records the size and sha256 of every file
LEGACY_VERSION = 1  # no file records
MAX_TENSOR_ELEMENTS = 1 << 32
MAX_TASKS = 1_000_000
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,255}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_FINGERPRINT = re.compile(r"^sha256:[0-9a-f]{64}$")

Check = Callable[[Any, str], Any]


class UnverifiedBundleWarning(UserWarning):
    """A bundle without file records (format 1): its files are not hash-checked."""


def _fail(where: str, value: Any, expected: str) -> ArtifactError:
    return ArtifactError(f"{where} is {_show(value)}, expected {expected}")


def _show(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, str, int, float, bool, type(None))) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- field checks: (value, where) -> the value, or ArtifactError naming where and what was expected ----

def integer(low: int, high: int) -> Check:
    def check(value: Any, where: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise _fail(where, value, f"an integer in [{low}, {high}]")
        return value
    return check


def number(low: float, high: float, low_open: bool = False) -> Check:
    def check(value: Any, where: str) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not (low < value if low_open else low <= value) or value > high:
            raise _fail(where, value, f"a finite number in {'(' if low_open else '['}{low}, {high}]")
        return float(value)
    return check


def text(pattern: re.Pattern | None = None, choices: tuple[str, ...] = (), max_len: int = 256) -> Check:
    def check(value: Any, where: str) -> str:
        if not isinstance(value, str) or len(value) > max_len or (choices and value not in choices) or \
                (pattern is not None and not pattern.match(value)):
            raise _fail(where, value, f"one of {', '.join(choices)}" if choices else "a valid name")
        return value
    return check


def boolean(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(where, value, "true or false")
    return value


def optional(inner: Check) -> Check:
    return lambda value, where: None if value is None else inner(value, where)


def array(item: Check, min_len: int = 0, max_len: int = 1 << 20) -> Check:
    def check(value: Any, where: str) -> list:
        if not isinstance(value, list) or not min_len <= len(value) <= max_len:
            raise _fail(where, value, f"a list of {min_len}..{max_len} items")
        return [item(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return check


def mapping(key: Check, value: Check, max_len: int = MAX_TASKS) -> Check:
    def check(data: Any, where: str) -> dict:
        if not isinstance(data, dict) or len(data) > max_len:
            raise _fail(where, data, "a JSON object")
        return {key(k, f"{where} key"): value(v, f"{where}.{k}") for k, v in data.items()}
    return check


def record(cls: type, where: str, data: Any, legacy: bool = False) -> Any:
    """Build dataclass `cls` from `data`, each field validated by its `check` metadata.

    Every field is required in the current version; a legacy manifest may omit the ones with defaults.
    """
    if not isinstance(data, dict):
        raise _fail(where, data, "a JSON object")
    values = {}
    for spec in fields(cls):
        name = spec.name
        if name not in data:
            if legacy and (spec.default is not MISSING or spec.default_factory is not MISSING):
                continue
            raise ArtifactError(f"{where}.{name} is missing; {REBUILD}")
        values[name] = spec.metadata["check"](data[name], f"{where}.{name}")
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        warnings.warn(f"{where}: unknown key(s) {', '.join(unknown[:5])} ignored (written by a newer "
                      "rmt-deploy?)", UserWarning, stacklevel=3)
    return cls(**values)


def checked(check: Check, **kwargs: Any) -> Any:
    """A dataclass field validated by `check`."""
    return field(metadata={"check": check}, **kwargs)


def nested(cls: type) -> Check:
    return lambda value, where: record(cls, where, value)


def task_name(value: Any, where: str) -> str:
    try:
        return check_task_name(value)
    except Exception:  # InputError from the task-file rules
        raise _fail(where, value, "a task name (1-128 letters, digits, '_', '.', '-')") from None


# ---- the schema ----

@dataclass
class MaskedTensor:
    """A weight that tasks mask: its open_clip name and its graph input name."""

    name: str = checked(text(_NAME))
    shape: list[int] = checked(array(integer(1, MAX_TENSOR_ELEMENTS), 1, 8))
    dtype: str = checked(text(choices=("float32", "float16")))
    input_name: str = checked(text(_NAME))


@dataclass
class Preprocess:
    """open_clip's eval transform settings for this base."""

    image_size: list[int] = checked(array(integer(1, 2048), 2, 2))
    mean: list[float] = checked(array(number(-10.0, 10.0), 3, 3))
    std: list[float] = checked(array(number(1e-6, 10.0), 3, 3))
    interpolation: str = checked(text(choices=("bicubic", "bilinear", "random")), default="bicubic")
    resize_mode: str = checked(text(choices=("shortest", "longest", "squash")), default="shortest")


def _path(value: Any, where: str) -> str:
    return relative_path(value, where)


def _backend_files(value: Any, where: str) -> dict[str, Any]:
    """{"base": path, "constant": path, "folded": {task: path}}: all optional."""
    if not isinstance(value, dict) or not set(value) <= {"base", "constant", "folded"}:
        raise _fail(where, value, 'an object with "base", "constant" and/or "folded"')
    out = {}
    for key in ("base", "constant"):
        if key in value:
            out[key] = _path(value[key], f"{where}.{key}")
    if "folded" in value:
        out["folded"] = mapping(task_name, _path)(value["folded"], f"{where}.folded")
    return out


def _fingerprint(value: Any, where: str) -> str:
    return text(_FINGERPRINT, max_len=71)(value, where)


def _sha_or_empty(value: Any, where: str) -> str:
    if value == "":
        return value
    return text(_HEX64, max_len=64)(value, where)


def _path_or_empty(value: Any, where: str) -> str:
    return value if value == "" else _path(value, where)


def _json_object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, value, "a JSON object")
    return value


@dataclass
class Manifest:
    """Everything the runtime needs to know about a bundle, stored as manifest.json.

    `output_kind` "embedding": base.onnx returns L2-normalised image embeddings (output
    `output_name`), and each task's head (rmt_deploy.artifacts.heads, by its kind) turns them into
    logits. `files` maps backend ("onnx", "tensorrt") -> {"base": path, "folded": {task: path}}, and "onnx" may
    name a "constant" graph: base.onnx with the masked weights as initializers the runtime supplies. `tensorrt` holds
    engine metadata (GPU, TensorRT version, refit map). `base_weights` is the safetensors file of
    the masked tensors' base values. `checksums` records every file of the bundle (path ->
    size, sha256); each reader checks the files it uses against it.
    """

    model_name: str = checked(text(max_len=256))
    pretrained: str | None = checked(optional(text(max_len=4096)))
    fingerprint: str = checked(_fingerprint)
    preprocess: Preprocess = checked(nested(Preprocess))
    masked_tensors: list[MaskedTensor] = checked(array(nested(MaskedTensor), 1, 4096))
    embed_dim: int = checked(integer(1, 1 << 16))
    tasks: list[str] = checked(array(task_name, 0, MAX_TASKS))
    files: dict[str, Any] = checked(mapping(text(choices=("onnx", "tensorrt")), _backend_files, 2))
    input_name: str = checked(text(_NAME), default="image")
    output_name: str = checked(text(_NAME), default="embedding")
    output_kind: str = checked(text(choices=("embedding",)), default="embedding")
    max_batch: int = checked(integer(1, 4096), default=64)
    precision: str = checked(text(choices=("fp32", "fp16")), default="fp32")
    tensorrt: dict[str, Any] = checked(_json_object, default_factory=dict)
    tools: dict[str, str] = checked(mapping(text(max_len=128), text(max_len=128), 64), default_factory=dict)
    masked_inputs: str = checked(text(choices=("required", "defaults")), default="required")
    base_weights: str = checked(_path_or_empty, default="")
    base_weights_sha256: str = checked(_sha_or_empty, default="")
    quick_gelu: bool = checked(boolean, default=False)
    checksums: dict[str, FileRecord] = checked(mapping(_path, FileRecord.from_json), default_factory=dict)
    format: str = checked(text(choices=(BUNDLE_FORMAT,)), default=BUNDLE_FORMAT)
    version: int = checked(integer(LEGACY_VERSION, BUNDLE_VERSION), default=BUNDLE_VERSION)

    @property
    def verified(self) -> bool:
        """Whether the manifest records its files (version 2 and later)."""
        return self.version >= HASHED_VERSION

    def to_json(self) -> str:
        data = asdict(self)
        data["checksums"] = {path: rec.to_json() for path, rec in self.checksums.items()}
        return json.dumps(data, indent=2)

    def named_files(self) -> dict[str, str]:
        """Every file the manifest names, by role (e.g. 'files.onnx.folded.dtd') -> relative path."""
        named = {f"tasks.{t}": f"tasks/{t}.rmtask" for t in self.tasks}
        if self.base_weights:
            named["base_weights"] = self.base_weights
        for backend, entry in self.files.items():
            for key in ("base", "constant"):
                if key in entry:
                    named[f"files.{backend}.{key}"] = entry[key]
            for task, path in entry.get("folded", {}).items():
                named[f"files.{backend}.folded.{task}"] = path
        return named

    @classmethod
    def from_dict(cls, data: Any) -> "Manifest":
        """Validate a parsed manifest.json; ArtifactError naming the first bad field."""
        if not isinstance(data, dict):
            raise _fail("manifest", data, "a JSON object")
        _check_version(data)
        legacy = data["version"] == LEGACY_VERSION
        manifest = record(cls, "manifest", data, legacy=legacy)
        _check_consistency(manifest)
        if legacy:
            warnings.warn("this bundle is format 1 and records no file hashes: its files are "
                          f"not verified; {REBUILD} to verify them", UnverifiedBundleWarning, stacklevel=3)
        return manifest


def _check_version(data: dict[str, Any]) -> None:
    if data.get("format") != BUNDLE_FORMAT:
        raise ArtifactError(f"manifest format tag {_show(data.get('format'))} is not {BUNDLE_FORMAT!r}: "
                            "not an rmt-deploy bundle")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < LEGACY_VERSION:
        raise ArtifactError(f"manifest version {_show(version)} is not valid; {REBUILD}")
    if version > BUNDLE_VERSION:
        raise ArtifactError(f"manifest version {version} was written by a newer rmt-deploy (this one reads "
                            f"versions {LEGACY_VERSION}-{BUNDLE_VERSION}): upgrade rmt-deploy")


def _check_consistency(manifest: Manifest) -> None:
    _unique("manifest.tasks", manifest.tasks)
    _unique("manifest.masked_tensors names", [t.name for t in manifest.masked_tensors])
    inputs = [t.input_name for t in manifest.masked_tensors]
    _unique("manifest.masked_tensors input names", inputs + [manifest.input_name])
    for tensor in manifest.masked_tensors:
        if math.prod(tensor.shape) > MAX_TENSOR_ELEMENTS:
            raise ArtifactError(f"manifest: masked tensor {tensor.name!r} declares {tensor.shape}, more than "
                                f"{MAX_TENSOR_ELEMENTS} elements")
    tasks = set(manifest.tasks)
    for backend, entry in manifest.files.items():
        stray = sorted(set(entry.get("folded", {})) - tasks)
        if stray:
            raise ArtifactError(f"manifest.files.{backend}.folded names task {stray[0]!r}, which is not in "
                                f"manifest.tasks; {REBUILD}")
    if manifest.verified:
        missing = sorted(role for role, path in manifest.named_files().items() if path not in manifest.checksums)
        if missing:
            raise ArtifactError(f"manifest.checksums has no record for {missing[0]} "
                                f"({manifest.named_files()[missing[0]]}); {REBUILD}")


def _unique(where: str, names: list[str]) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise ArtifactError(f"{where}: {name!r} appears twice; {REBUILD}")
        seen.add(name)
