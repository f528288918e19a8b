"""TensorRT engines from the exported ONNX, for TensorRT 10 and 11.

Shared mode: one engine built with REFIT_INDIVIDUAL where only the masked
weights are marked refittable (plain REFIT disables fusions; REFIT_IDENTICAL
forbids new weights); a task switch refits those weights. Folded mode: one
plain engine per task. FP16 goes through the strongly typed fp16 ONNX, since
TensorRT 11 has no FP16 builder flag. Engines are tied to a GPU model and a
TensorRT version: both are in the file name and the manifest (rmt_deploy.artifacts.tensorrt_files
names engine files and says whether one runs here, for export and runtime alike).

The parts that need no GPU (refit map, build plan, names, manifest entries)
are plain functions; the rest needs `tensorrt` and a CUDA device.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np

from rmt_deploy.errors import ArtifactError, InternalError, MissingDependencyError

MIN_TENSORRT_MAJOR = 10
REFIT_FLAG = "REFIT_INDIVIDUAL"
TENSORRT_FP32_TOLERANCE = 1e-4  # relative L2: fp32 kernels with TF32 off still reorder sums
_NO_TENSORRT = (
    "TensorRT is not installed ({reason}): --target trt needs the `tensorrt` package, which installs only "
    "on a machine with an NVIDIA GPU and driver (pip install 'rmt-deploy[trt]' there); "
    "on this machine export with --target onnx"
)


@dataclass(frozen=True)
class RefitEntry:
    """How one masked tensor reaches the shared engine: its TensorRT weights name and layout.

    Refit with `np.ascontiguousarray(np.transpose(base * mask, perm))` (no transpose when
    `perm` is None), in `dtype`, through Refitter.set_named_weights(weights, ...).
    """

    tensor: str
    weights: str
    perm: list[int] | None
    shape: list[int]
    dtype: str


@dataclass(frozen=True)
class BuildPlan:
    """What to ask the builder for; chosen without TensorRT, applied by build_engine."""

    flags: tuple[str, ...]
    cleared_flags: tuple[str, ...]
    strongly_typed: bool
    refittable: tuple[str, ...]
    profile: dict[str, list[list[int]]] = field(default_factory=dict)  # input -> [min, opt, max]


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def check_version(trt_version: str) -> None:
    """MissingDependencyError unless TensorRT is 10 or newer (REFIT_INDIVIDUAL, strongly typed networks)."""
    major = (version_tuple(trt_version) or (0,))[0]
    if major < MIN_TENSORRT_MAJOR:
        raise MissingDependencyError(
            f"TensorRT {trt_version} is too old: rmt-deploy needs TensorRT >= {MIN_TENSORRT_MAJOR} "
            "(REFIT_INDIVIDUAL, strongly typed networks); pip install 'rmt-deploy[trt]'"
        )


def plan_build(trt_version: str, *, shared: bool, precision: str, max_batch: int,
               image_shape: list[int], input_name: str = "image",
               refittable: tuple[str, ...] = ()) -> BuildPlan:
    """Choose builder flags, network typing and the dynamic batch profile 1..max_batch."""
    check_version(trt_version)
    if precision not in ("fp32", "fp16"):
        raise InternalError(f"unknown precision {precision!r}")
    if shared and not refittable:
        raise InternalError("a shared engine needs the masked weights' names to mark refittable")
    flags = (REFIT_FLAG,) if shared else ()
    # fp32 must match torch: TF32 (on by default on Ampere+) would not. fp16 is typed in the graph.
    cleared = ("TF32",) if precision == "fp32" else ()
    opt = min(max_batch, 8)
    profile = {input_name: [[1, *image_shape], [opt, *image_shape], [max_batch, *image_shape]]}
    return BuildPlan(flags, cleared, True, tuple(refittable) if shared else (), profile)


def refit_map(model: Any, masked_inputs: Mapping[str, str]) -> dict[str, RefitEntry]:
    """open_clip name -> RefitEntry, from the shared onnx_ir graph (masked weights as inputs).

    A masked input read only through Transpose nodes with one permutation is stored
    pre-transposed (TensorRT would fold the transpose and lose the name); the entry says so.
    """
    inputs = {value.name: value for value in model.graph.inputs}
    entries = {}
    for tensor, name in masked_inputs.items():
        value = inputs.get(name)
        if value is None:
            raise InternalError(f"graph has no input {name!r} for masked tensor {tensor!r}")
        shape = [int(d) for d in value.shape]
        perm = _common_transpose(value)
        if perm is not None:
            shape = [shape[p] for p in perm]
        dtype = np.dtype(value.dtype.numpy()).name
        entries[tensor] = RefitEntry(tensor, name, perm, shape, dtype)
    return entries


def _common_transpose(value: Any) -> list[int] | None:
    """The permutation every consumer applies to `value`, None if no consumer is a Transpose.

    Mixed consumers (some Transpose, some not) or Transposes with different permutations
    raise InternalError: the ONNX importer could fold a Transpose of an initializer into an
    unnamed constant, so the named weights would not be what the engine computes with.
    """
    users = [use.node for use in value.uses()]
    transposes = [node for node in users if node.op_type == "Transpose"]
    if not transposes:
        return None
    if len(transposes) != len(users):
        others = sorted({node.op_type for node in users if node.op_type != "Transpose"})
        raise InternalError(f"masked input {value.name!r} is read both through Transpose and directly "
                            f"({', '.join(others)}): it cannot be stored in one refittable layout")
    rank = len(value.shape)
    perms = set()
    for node in transposes:
        attr = node.attributes.get("perm")
        perms.add(tuple(attr.as_ints()) if attr is not None else tuple(reversed(range(rank))))
    if len(perms) != 1:
        raise InternalError(f"masked input {value.name!r} is transposed with different permutations "
                            f"{sorted(perms)}: it cannot be stored in one refittable layout")
    return list(perms.pop())


def refittable_model(model: Any, refit: Mapping[str, RefitEntry], base_values: Mapping[str, np.ndarray]) -> Any:
    """Turn the shared graph's masked inputs into initializers named as `refit` says (in place).

    `base_values` maps open_clip name -> base tensor in the graph dtype. Transposes recorded
    in the map are applied to the stored data and their nodes removed.
    """
    import onnx_ir as ir

    graph = model.graph
    inputs = {value.name: value for value in graph.inputs}
    for tensor, entry in refit.items():
        value = inputs[entry.weights]
        array = np.asarray(base_values[tensor])
        graph.inputs.remove(value)
        if entry.perm is None:
            value.const_value = ir.tensor(np.ascontiguousarray(array), name=entry.weights)
            if entry.weights not in graph.initializers:
                graph.register_initializer(value)
            continue
        stored = np.ascontiguousarray(np.transpose(array, entry.perm))
        if entry.weights in graph.initializers:
            graph.initializers.pop(entry.weights)
        weights = ir.Value(name=entry.weights, const_value=ir.tensor(stored, name=entry.weights),
                           type=ir.TensorType(value.dtype), shape=ir.Shape(list(stored.shape)))
        graph.register_initializer(weights)
        for use in list(value.uses()):
            transpose = use.node
            transpose.outputs[0].replace_all_uses_with(weights)
            graph.remove(transpose, safe=True)
    return model


def tensorrt_manifest(trt_version: str, gpu: Mapping[str, str], precision: str, plan: BuildPlan,
                      refit: Mapping[str, RefitEntry] | None, engines: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's `tensorrt` entry: versions, GPU, profile, refit map and engine files."""
    return {
        "version": trt_version,
        "gpu": dict(gpu),
        "precision": precision,
        "strongly_typed": plan.strongly_typed,
        "builder_flags": list(plan.flags),
        "profile": plan.profile,
        "refit": {"flag": REFIT_FLAG, "weights": {k: asdict(v) for k, v in refit.items()}} if refit else {},
        "engines": dict(engines),
    }


# ---- everything below needs tensorrt and a CUDA device ----

def require_tensorrt() -> Any:
    """Import tensorrt (>= 10) and check for a CUDA device, else MissingDependencyError saying why."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise MissingDependencyError(_NO_TENSORRT.format(reason=exc)) from None
    check_version(trt.__version__)
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("--target trt needs torch with CUDA: pip install 'rmt-deploy[train]'") from None
    if not torch.cuda.is_available():
        raise MissingDependencyError("--target trt needs a CUDA device, and torch sees none on this machine")
    return trt


def current_gpu() -> dict[str, str]:
    """Name and compute capability of CUDA device 0."""
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def build_engine(trt: Any, onnx_path: Any, plan: BuildPlan) -> bytes:
    """Parse an ONNX file (external data found next to it) and build a serialized engine."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if plan.strongly_typed and typed is not None:  # on TensorRT 11 every network is strongly typed
        flags |= 1 << int(typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArtifactError(f"{onnx_path}: TensorRT cannot parse the ONNX: {errors}")
    config = builder.create_builder_config()
    for name in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in plan.cleared_flags:
        if hasattr(trt.BuilderFlag, name):
            config.clear_flag(getattr(trt.BuilderFlag, name))
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in plan.profile.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    for name in plan.refittable:
        if not network.mark_weights_refittable(name):
            raise InternalError(f"TensorRT network has no weights named {name!r} to mark refittable")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ArtifactError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    return bytes(serialized)


class EngineRunner:
    """Runs a serialized engine on torch CUDA buffers; refits named weights for shared engines."""

    def __init__(self, trt: Any, plan: bytes):
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ArtifactError("TensorRT cannot deserialize the engine it just built")
        self.context = self.engine.create_execution_context()

    def refittable(self) -> list[str]:
        return list(self.trt.Refitter(self.engine, self.logger).get_all_weights())

    def refit(self, weights: Mapping[str, np.ndarray]) -> None:
        """Refit from host arrays; weights validation stays on (the default) at export time."""
        refitter = self.trt.Refitter(self.engine, self.logger)
        keep = {name: np.ascontiguousarray(array) for name, array in weights.items()}
        for name, array in keep.items():
            if not refitter.set_named_weights(name, self.trt.Weights(array)):
                raise InternalError(f"TensorRT refused new weights for {name!r}")
        if not refitter.refit_cuda_engine():
            raise InternalError("TensorRT refit failed (missing weights: "
                                f"{refitter.get_missing_weights()})")

    def run(self, inputs: Mapping[str, np.ndarray], output: str) -> np.ndarray:
        import torch

        buffers = {}
        for name, array in inputs.items():
            buffers[name] = torch.from_numpy(np.ascontiguousarray(array)).cuda()
            if not self.context.set_input_shape(name, tuple(array.shape)):
                raise InternalError(f"TensorRT engine rejects input {name!r} of shape {tuple(array.shape)} "
                                    "(outside its optimization profile)")
            self.context.set_tensor_address(name, buffers[name].data_ptr())
        shape = tuple(self.context.get_tensor_shape(output))
        dtype = torch.from_numpy(np.empty(0, self.trt.nptype(self.engine.get_tensor_dtype(output)))).dtype
        result = torch.empty(shape, dtype=dtype, device="cuda")
        self.context.set_tensor_address(output, result.data_ptr())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())  # the input copies above ran on the current stream
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise InternalError("TensorRT execution failed")
        stream.synchronize()
        return result.cpu().numpy()
