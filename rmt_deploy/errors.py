"""Exception types: `RmtError` for anything a user can fix, `InternalError` for bugs."""
from __future__ import annotations


class RmtError(Exception):
    """A problem the user can fix; the message names the bad value and the fix."""


class ArtifactError(RmtError):
    """A file is unreadable, truncated, altered or of the wrong format."""


class IncompatibleBaseError(RmtError):
    """A task pack was trained on a different base model (fingerprint mismatch)."""


class UnknownTaskError(RmtError):
    """A task name that the bundle or engine does not hold."""


class InputError(RmtError):
    """Bad user input: arguments, images, data sets, paths."""


class MissingDependencyError(RmtError):
    """An optional package is missing; the message names the extra to install."""


class InternalError(Exception):
    """A bug in rmt-deploy, not in the user's input."""


def check_format(data: dict, tag: str, version: int, where: str, fix: str) -> None:
    """Raise ArtifactError unless data's "format" is `tag` and its "version" is `version`."""
    if data.get("format") != tag:
        raise ArtifactError(f"{where}: format tag {data.get('format')!r} is not {tag!r}")
    if data.get("version") != version:
        raise ArtifactError(f"{where}: format version {data.get('version')!r} is not supported "
                            f"(this rmt-deploy reads version {version}); {fix}")


# top-level optional module -> the extra that installs it
EXTRA_FOR_MODULE = {
    "torch": "train", "torchvision": "train", "open_clip": "train", "onnxscript": "train", "onnx_ir": "train",
    "onnx": "train", "onnxruntime": "onnx",
    "pytriton": "serve", "tritonclient": "serve",
    "tensorrt": "trt", "cuda": "trt",
    "skimage": "demo", "sklearn": "demo", "matplotlib": "demo",
    "jsonschema": "dev", "pytest": "dev", "hypothesis": "dev",
}


def missing_dependency(exc: ModuleNotFoundError) -> MissingDependencyError | None:
    """The MissingDependencyError for an optional module that failed to import, or None."""
    module = (exc.name or "").split(".")[0]
    extra = EXTRA_FOR_MODULE.get(module)
    if extra is None:
        return None
    return MissingDependencyError(f"{module} is not installed; install it with: pip install 'rmt-deploy[{extra}]'")


def require(module: str, extra: str):
    """Import an optional module or raise MissingDependencyError naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{module} is not installed ({exc}); install it with: pip install 'rmt-deploy[{extra}]'"
        ) from None
