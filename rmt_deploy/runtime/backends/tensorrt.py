"""TensorRT backend: the bundle's refittable shared engine, switched by refitting the masked weights.

The engine was built with REFIT_INDIVIDUAL and only the masked weights refittable
(see rmt_deploy.export.tensorrt). Each pool slot has its own device copy of the masked
weights. A switch to a task whose slot is already on the device points the Refitter at
that slot's device buffers (set_named_weights, no copy) and calls
`refit_cuda_engine_async` on the run stream; a slot the pool rewrote in place is first
copied host-to-device. The Refitter is given every weight before every refit (the docs
do not promise that weights set once stay set), with weights validation off: export
already checked each refit against torch. The pool stores each weight in the engine's
layout (transposed where the refit map says so), so no transpose happens at switch time.
Needs `tensorrt` (>= 10) and `cuda-python` (pip install 'rmt-deploy[trt]'); never torch.
Runs are serialised (one engine state); any thread may call them, each call first makes
the backend's device current on that thread (cudaSetDevice is per host thread).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from rmt_deploy.artifacts.bundle import Bundle
from rmt_deploy.artifacts.integrity import read_verified
from rmt_deploy.artifacts.tensorrt_files import engine_mismatch
from rmt_deploy.errors import ArtifactError, InputError, InternalError, MissingDependencyError
from rmt_deploy.runtime.backends.contract import NoBackgroundWork, parse_device
from rmt_deploy.runtime.baseweights import SafetensorsReader
from rmt_deploy.runtime.buffer_pool import Lease, TensorSpec

MAX_PLAN_BYTES = 16 << 30

_INSTALL = "pip install 'rmt-deploy[trt]' on a machine with an NVIDIA GPU and driver"
_REEXPORT = "re-export the bundle with --target trt on this machine"
# numpy dtype name -> TensorRT DataType member, for the masked weights the Refitter takes
WEIGHT_TYPES = {"float32": "FLOAT", "float16": "HALF"}


def _import_tensorrt() -> Any:
    try:
        import tensorrt
    except Exception as exc:  # noqa: BLE001 - ImportError, or OSError etc. from a missing libnvinfer or driver
        raise MissingDependencyError(f"TensorRT is not installed or does not load ({type(exc).__name__}: {exc}): "
                                     f"{_INSTALL}") from None
    return tensorrt


def _import_cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except Exception as exc:  # noqa: BLE001 - as for tensorrt
            raise MissingDependencyError(f"cuda-python is not installed or does not load "
                                         f"({type(exc).__name__}: {exc}): {_INSTALL}") from None
    except Exception as exc:  # noqa: BLE001 - as for tensorrt
        raise MissingDependencyError(f"cuda-python does not load ({type(exc).__name__}: {exc}): {_INSTALL}") from None
    return cudart


def _check(cudart: Any, result: Any) -> Any:
    """cuda-python calls return (error, *values): raise on error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise InternalError(f"CUDA call failed: {cudart.cudaGetErrorString(err)[1]!r}")
    return values[0] if len(values) == 1 else values


def gpu_name(index: int) -> str | None:
    """Name of CUDA device `index` (None without cuda-python or a device)."""
    try:
        cudart = _import_cudart()
        err, props = cudart.cudaGetDeviceProperties(index)
    except (MissingDependencyError, RuntimeError):
        return None
    if int(err) != 0:
        return None
    name = props.name
    return (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).rstrip("\x00")


def engine_for_device(bundle: Bundle, index: int) -> Path | None:
    """The bundle's shared engine if it was built for this GPU model and TensorRT version;
    None when it was not, or tensorrt, cuda-python or the device is unavailable."""
    relative = bundle.manifest.files.get("tensorrt", {}).get("base")
    name = gpu_name(index) if relative else None
    if name is None:
        return None
    try:
        trt = _import_tensorrt()
    except MissingDependencyError:
        return None
    if engine_mismatch(bundle.manifest.tensorrt, name, str(trt.__version__)) is not None:
        return None
    path = bundle.root / relative
    return path if path.is_file() else None


# ---- pure functions (no TensorRT, no GPU): what the backend checks and stores ----

def tensor_specs(manifest: Any) -> list[TensorSpec]:
    """One TensorSpec per masked tensor, keyed by its TensorRT weights name, in the engine's layout."""
    refit = (manifest.tensorrt or {}).get("refit", {}).get("weights", {})
    specs = []
    for tensor in manifest.masked_tensors:
        entry = refit.get(tensor.name)
        if entry is None:
            raise ArtifactError(f"bundle's TensorRT refit map lacks {tensor.name!r}; {_REEXPORT}")
        try:
            dtype = str(entry["dtype"])
            shape = tuple(int(d) for d in entry["shape"])
            perm = tuple(int(p) for p in entry["perm"]) if entry.get("perm") is not None else None
            key = str(entry["weights"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"bundle's TensorRT refit entry for {tensor.name!r} is malformed ({exc}); "
                                f"{_REEXPORT}") from None
        if dtype not in WEIGHT_TYPES:
            raise ArtifactError(f"masked weights {tensor.name!r} are {dtype}; the TensorRT backend refits only "
                                f"{', '.join(WEIGHT_TYPES)} weights: {_REEXPORT}")
        if perm is None:
            stored = tuple(tensor.shape)
        elif sorted(perm) == list(range(len(tensor.shape))):
            stored = tuple(tensor.shape[p] for p in perm)
        else:
            stored = None
        if stored != shape:
            raise ArtifactError(f"bundle's TensorRT refit entry for {tensor.name!r} has shape {list(shape)} "
                                f"(perm {perm}), the tensor is {list(tensor.shape)}; {_REEXPORT}")
        specs.append(TensorSpec(key, shape, np.dtype(dtype), tensor.name, perm))
    return specs


def source_shape(spec: TensorSpec) -> tuple[int, ...]:
    """The open_clip (file) shape of a tensor the engine stores transposed by `spec.perm`."""
    if spec.perm is None:
        return spec.shape
    return tuple(spec.shape[spec.perm.index(axis)] for axis in range(len(spec.shape)))


def fill_base_all(weights: SafetensorsReader, specs: list[TensorSpec], arrays: Mapping[str, np.ndarray],
                  record: Any) -> str:
    """Every spec's base values into `arrays` in one hashed pass over the file (transposed ones via a
    temporary in the file layout); returns the file's sha256, checked against `record` if given."""
    staged = {s.tensor: (arrays[s.key] if s.perm is None else np.empty(source_shape(s), s.dtype)) for s in specs}
    digest = weights.read_all_into(staged, record)
    for spec in specs:
        if spec.perm is not None:
            arrays[spec.key][...] = np.transpose(staged[spec.tensor], spec.perm)
    return digest


@dataclass(frozen=True)
class EngineIO:
    """What a deserialised engine says about one I/O tensor: mode 'input'/'output', numpy dtype
    name (or TensorRT's name for a type numpy lacks), and `shape`: optimization profile 0's
    max shape for an input, the engine's tensor shape (-1 where dynamic) for an output."""

    mode: str
    dtype: str
    shape: tuple[int, ...] | None = None


def engine_io_mismatch(io: Mapping[str, EngineIO], input_name: str, output_name: str, max_batch: int,
                       image_shape: tuple[int, ...], embed_dim: int) -> str | None:
    """Why the engine's I/O does not fit the manifest (None if it does)."""
    names = ", ".join(f"{n} ({v.mode} {v.dtype})" for n, v in io.items()) or "none"
    for name, mode in ((input_name, "input"), (output_name, "output")):
        tensor = io.get(name)
        if tensor is None or tensor.mode != mode:
            return f"engine has no {mode} tensor {name!r} (its I/O: {names})"
        if tensor.dtype != "float32":
            return f"engine {mode} {name!r} is {tensor.dtype}, the runtime feeds and reads float32"
    expected = (max_batch, *image_shape)
    got = io[input_name].shape
    if got is None or tuple(got) != expected:
        return (f"engine input {input_name!r} accepts at most shape {list(got) if got else None}, "
                f"the manifest says {list(expected)} (max_batch {max_batch})")
    out_dim = io[output_name].shape
    if out_dim is not None and len(out_dim) and out_dim[-1] not in (-1, embed_dim):
        return f"engine output {output_name!r} has {out_dim[-1]} features, the manifest says {embed_dim}"
    return None


@dataclass
class _DeviceSlot:
    """Device copy of one pool slot's masked weights; `generation` = the pool generation it holds."""

    buffers: dict[str, int] = field(default_factory=dict)
    generation: int | None = None


class TensorRTBackend(NoBackgroundWork):
    """Deserialised refittable engine; a switch = point the Refitter at a slot's device weights + async refit."""

    concurrent = False

    def __init__(self, bundle: Bundle, device: str, threads: int | None):
        self.trt, self.cudart = _import_tensorrt(), _import_cudart()
        self.stream = None
        self.refitter = self.context = self.engine = None
        self._slots: dict[int, _DeviceSlot] = {}
        self._image = self._embedding = 0
        self._active: tuple[int, int] | None = None
        self.name = "tensorrt"
        manifest = bundle.manifest
        self.input_name, self.output_name = manifest.input_name, manifest.output_name
        self.max_batch = int(manifest.max_batch)
        self.image_shape = (3, *(int(d) for d in manifest.preprocess.image_size))
        self.embed_dim = int(manifest.embed_dim)
        path = self._engine_path(bundle, device)
        self.specs = tensor_specs(manifest)  # before any CUDA allocation: a bad map fails cheaply
        self._load_engine(path, bundle.record(manifest.files["tensorrt"]["base"]))
        self.stream = _check(self.cudart, self.cudart.cudaStreamCreate())
        try:  # from here on a failure frees what was allocated
            weights_relative = manifest.base_weights or "base_weights.safetensors"
            self.weights = SafetensorsReader(bundle.file(weights_relative))
            self.weights_record = bundle.record(weights_relative)
            for spec in self.specs:  # the file must hold each tensor as declared, before any allocation
                self.weights.entry(spec.tensor, spec.dtype, source_shape(spec))
            self.base_file = self.weights.path
            self._allocate_buffers(path)
        except BaseException:
            self.close()
            raise

    def _engine_path(self, bundle: Bundle, device: str) -> Path:
        """The bundle's shared engine, checked to fit this GPU and TensorRT; sets the device index."""
        kind, index = parse_device(device)
        if kind != "cuda":
            raise MissingDependencyError("the TensorRT backend runs on a GPU: pass device='cuda'")
        relative = bundle.manifest.files.get("tensorrt", {}).get("base")
        if not relative:
            raise ArtifactError(f"bundle {bundle.root} has no shared TensorRT engine; export it with "
                                "--target trt --mode shared or both on this GPU")
        name = gpu_name(index)
        if name is None:
            raise MissingDependencyError(f"no CUDA device {index} is visible: {_INSTALL}")
        why = engine_mismatch(bundle.manifest.tensorrt, name, str(self.trt.__version__))
        if why:
            raise ArtifactError(f"{bundle.root / relative}: {why}")
        self.device_index = index
        return bundle.file(relative)

    def _load_engine(self, path: Path, record: Any) -> None:
        """Deserialise the engine, check its I/O against the manifest, create the execution context."""
        trt = self.trt
        self._use_device()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(read_verified(path, record, MAX_PLAN_BYTES))
        if self.engine is None:
            raise ArtifactError(f"{path}: TensorRT cannot deserialize the engine; {_REEXPORT}")
        why = engine_io_mismatch(self._engine_io(), self.input_name, self.output_name, self.max_batch,
                                 self.image_shape, self.embed_dim)
        if why:
            raise ArtifactError(f"{path}: {why}; {_REEXPORT}")
        self.context = self.engine.create_execution_context()

    def _allocate_buffers(self, path: Path) -> None:
        """Device buffers for the image batch and the embeddings, and the Refitter over the masked weights."""
        trt = self.trt
        self._types = {spec.key: getattr(trt.DataType, WEIGHT_TYPES[spec.dtype.name]) for spec in self.specs}
        self._image = self._malloc(self.max_batch * int(np.prod(self.image_shape)) * 4)
        self._embedding = self._malloc(self.max_batch * self.embed_dim * 4)
        self.refitter = trt.Refitter(self.engine, self.logger)
        self.refitter.weights_validation = False  # export checked every refit against torch; skip the scan
        missing = {spec.key for spec in self.specs} - set(self.refitter.get_all_weights())
        if missing:
            raise ArtifactError(f"{path}: engine has no refittable weights {sorted(missing)}; {_REEXPORT}")

    # ------------------------------------------------------------ checks

    def _engine_io(self) -> dict[str, EngineIO]:
        """The engine's I/O tensors as EngineIO (for engine_io_mismatch)."""
        trt, engine = self.trt, self.engine
        io = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            modes = {trt.TensorIOMode.INPUT: "input", trt.TensorIOMode.OUTPUT: "output"}
            kind = modes.get(engine.get_tensor_mode(name), "none")
            data_type = engine.get_tensor_dtype(name)
            try:
                dtype = np.dtype(trt.nptype(data_type)).name
            except (TypeError, KeyError, ValueError):  # a type numpy has no name for (bfloat16, fp8, ...)
                dtype = str(data_type)
            if kind == "input":
                shapes = engine.get_tensor_profile_shape(name, 0)  # [min, opt, max]
                shape = tuple(int(d) for d in shapes[-1]) if shapes else None
            else:
                shape = tuple(int(d) for d in engine.get_tensor_shape(name))
            io[name] = EngineIO(kind, dtype, shape)
        return io

    # ------------------------------------------------------------ CUDA helpers

    def _use_device(self) -> None:
        """Make this backend's GPU current on the calling thread (per-thread CUDA state)."""
        _check(self.cudart, self.cudart.cudaSetDevice(self.device_index))

    def _malloc(self, nbytes: int) -> int:
        return int(_check(self.cudart, self.cudart.cudaMalloc(nbytes)))

    def _memcpy(self, dst: int, src: int, nbytes: int, kind: Any) -> None:
        _check(self.cudart, self.cudart.cudaMemcpyAsync(dst, src, nbytes, kind, self.stream))

    def _device_slot(self, index: int) -> _DeviceSlot:
        """Device buffers for pool slot `index`, allocated the first time the slot is seen."""
        slot = self._slots.get(index)
        if slot is None:
            slot = self._slots[index] = _DeviceSlot()
            for spec in self.specs:
                slot.buffers[spec.key] = self._malloc(spec.size * spec.dtype.itemsize)
        return slot

    # ------------------------------------------------------------ backend API

    def fill_base(self, arrays: dict[str, np.ndarray]) -> str:
        return fill_base_all(self.weights, self.specs, arrays, self.weights_record)

    def _activate(self, lease: Lease) -> None:
        """Queue the refit to the lease's weights on the run stream (no-op if already active)."""
        if self._active == (lease.slot, lease.generation):
            return
        slot = self._device_slot(lease.slot)
        if slot.generation != lease.generation:  # the pool rewrote this slot (or it is new): upload it
            h2d = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            for spec in self.specs:
                array = lease.arrays[spec.key]
                if array.dtype != spec.dtype or array.size != spec.size or not array.flags.c_contiguous:
                    raise InternalError(f"pool buffer {spec.key!r} is {array.dtype} {array.shape}, "
                                        f"expected contiguous {spec.dtype} {spec.shape}")
                self._memcpy(slot.buffers[spec.key], array.ctypes.data, array.nbytes, h2d)
            slot.generation = lease.generation
        trt = self.trt
        for spec in self.specs:  # every refit: point the Refitter at this slot's device weights
            weights = trt.Weights(self._types[spec.key], slot.buffers[spec.key], spec.size)
            if not self.refitter.set_named_weights(spec.key, weights, trt.TensorLocation.DEVICE):
                raise ArtifactError(f"TensorRT engine refuses refit weights {spec.key!r}; {_REEXPORT}")
        missing = self.refitter.get_missing_weights()
        if missing:
            raise InternalError(f"TensorRT refitter still misses weights {list(missing)} after setting all of them")
        self._active = None  # until the refit is queued, the engine holds no known task
        if not self.refitter.refit_cuda_engine_async(int(self.stream)):
            raise InternalError("TensorRT refit failed (see the TensorRT log above)")
        self._active = (lease.slot, lease.generation)

    def prepare(self, lease: Lease) -> None:
        """Refit the engine to the lease's weights now (so a switch is complete when it returns)."""
        self._use_device()
        self._activate(lease)
        _check(self.cudart, self.cudart.cudaStreamSynchronize(self.stream))

    def run(self, batch: np.ndarray, lease: Lease) -> np.ndarray:
        cudart = self.cudart
        self._use_device()
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.image_shape:
            raise InputError(f"batch of shape {list(batch.shape)}: this engine takes [N, "
                             f"{', '.join(map(str, self.image_shape))}]")
        n = batch.shape[0]
        if not 1 <= n <= self.max_batch:
            raise InternalError(f"batch of {n} images: the engine runs 1..{self.max_batch} at a time")
        self._activate(lease)  # queued on the run stream, so the run below sees the new weights
        if not self.context.set_input_shape(self.input_name, tuple(batch.shape)):
            raise InputError(f"the TensorRT engine rejects input shape {list(batch.shape)} "
                             f"(its profile: 1..{self.max_batch} x {list(self.image_shape)})")
        self.context.set_tensor_address(self.input_name, self._image)
        self.context.set_tensor_address(self.output_name, self._embedding)
        out = np.empty((n, self.embed_dim), np.float32)
        self._memcpy(self._image, batch.ctypes.data, batch.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice)
        if not self.context.execute_async_v3(int(self.stream)):
            raise InternalError("TensorRT execution failed")
        self._memcpy(out.ctypes.data, self._embedding, out.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost)
        _check(cudart, cudart.cudaStreamSynchronize(self.stream))
        return out

    def close(self) -> None:
        cudart = getattr(self, "cudart", None)
        if cudart is None or getattr(self, "stream", None) is None:
            return
        cudart.cudaSetDevice(self.device_index)
        cudart.cudaStreamSynchronize(self.stream)
        self.refitter = None  # release the refitter (it references the device weights) before freeing them
        self.context = None
        pointers = [p for slot in self._slots.values() for p in slot.buffers.values()]
        for pointer in [*pointers, self._image, self._embedding]:
            if pointer:
                cudart.cudaFree(pointer)
        cudart.cudaStreamDestroy(self.stream)
        self._slots, self.stream, self._image, self._embedding = {}, None, 0, 0
        self._active = None
        self.engine = None
