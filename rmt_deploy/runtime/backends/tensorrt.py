"""TensorRT backend: the bundle's refittable shared engine, switched by refitting the masked weights.

The engine was built with REFIT_INDIVIDUAL and only the masked weights refittable
(see rmt_deploy.export.tensorrt). One device buffer per masked weight is registered
with the Refitter once; a switch copies the leased pool buffer into those device
buffers and calls `refit_cuda_engine_async` on the run stream. The pool stores each
weight in the engine's layout (transposed where the refit map says so), so no
transpose happens at switch time. Needs `tensorrt` (>= 10) and `cuda-python`
(pip install 'rmt-deploy[trt]'); never torch. Runs are serialised (one engine state).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rmt_deploy.bundle import Bundle
from rmt_deploy.errors import ArtifactError, InternalError, MissingDependencyError
from rmt_deploy.runtime.backends import parse_device
from rmt_deploy.runtime.baseweights import SafetensorsReader
from rmt_deploy.runtime.taskpool import Lease, TensorSpec

_INSTALL = "pip install 'rmt-deploy[trt]' on a machine with an NVIDIA GPU and driver"


def _import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as exc:
        raise MissingDependencyError(f"TensorRT is not installed ({exc}): {_INSTALL}") from None
    return tensorrt


def _import_cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as exc:
            raise MissingDependencyError(f"cuda-python is not installed ({exc}): {_INSTALL}") from None
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
    """The bundle's shared engine if it was built for this GPU model and TensorRT version."""
    from rmt_deploy.export.tensorrt import engine_mismatch

    relative = bundle.manifest.files.get("tensorrt", {}).get("base")
    name = gpu_name(index)
    if not relative or name is None:
        return None
    trt = _import_tensorrt()
    if engine_mismatch(bundle.manifest.tensorrt, name, str(trt.__version__)) is not None:
        return None
    path = bundle.root / relative
    return path if path.is_file() else None


class TensorRTBackend:
    """Deserialised refittable engine; a switch = H2D copy into registered buffers + async refit."""

    concurrent = False

    def __init__(self, bundle: Bundle, device: str, threads: int | None):
        from rmt_deploy.export.tensorrt import engine_mismatch

        trt, cudart = _import_tensorrt(), _import_cudart()
        self.trt, self.cudart = trt, cudart
        kind, index = parse_device(device)
        if kind != "cuda":
            raise MissingDependencyError("the TensorRT backend runs on a GPU: pass device='cuda'")
        manifest = bundle.manifest
        relative = manifest.files.get("tensorrt", {}).get("base")
        if not relative:
            raise ArtifactError(f"bundle {bundle.root} has no shared TensorRT engine; export it with "
                                "--target trt --mode shared or both on this GPU")
        name = gpu_name(index)
        if name is None:
            raise MissingDependencyError(f"no CUDA device {index} is visible: {_INSTALL}")
        why = engine_mismatch(manifest.tensorrt, name, str(trt.__version__))
        if why:
            raise ArtifactError(f"{bundle.root / relative}: {why}")
        _check(cudart, cudart.cudaSetDevice(index))
        self.name = "tensorrt"
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(bundle.file(relative).read_bytes())
        if self.engine is None:
            raise ArtifactError(f"{bundle.root / relative}: TensorRT cannot deserialize the engine; re-export it")
        self.context = self.engine.create_execution_context()
        self.stream = _check(cudart, cudart.cudaStreamCreate())
        self.input_name, self.output_name = manifest.input_name, manifest.output_name
        self.max_batch = int(manifest.max_batch)
        self.image_shape = (3, *manifest.preprocess.image_size)
        self.embed_dim = int(manifest.embed_dim)
        self.weights = SafetensorsReader(bundle.file(manifest.base_weights or "base_weights.safetensors"))
        self.specs = self._specs(manifest)
        self._buffers: dict[str, int] = {}
        self._allocate()
        self.refitter = trt.Refitter(self.engine, self.logger)
        self._register()
        self._active: tuple[int, int] | None = None

    def _specs(self, manifest: Any) -> list[TensorSpec]:
        refit = manifest.tensorrt.get("refit", {}).get("weights", {})
        specs = []
        for tensor in manifest.masked_tensors:
            entry = refit.get(tensor.name)
            if entry is None:
                raise ArtifactError(f"bundle's TensorRT refit map lacks {tensor.name!r}; re-export with --target trt")
            perm = tuple(entry["perm"]) if entry.get("perm") is not None else None
            specs.append(TensorSpec(entry["weights"], tuple(entry["shape"]), np.dtype(entry["dtype"]),
                                    tensor.name, perm))
        return specs

    def _malloc(self, nbytes: int) -> int:
        return int(_check(self.cudart, self.cudart.cudaMalloc(nbytes)))

    def _allocate(self) -> None:
        for spec in self.specs:
            self._buffers[spec.key] = self._malloc(spec.size * spec.dtype.itemsize)
        self._image = self._malloc(self.max_batch * int(np.prod(self.image_shape)) * 4)
        self._embedding = self._malloc(self.max_batch * self.embed_dim * 4)

    def _register(self) -> None:
        """Point the Refitter at the device buffers (once; repeated only if TensorRT forgot them)."""
        trt = self.trt
        types = {"float32": trt.DataType.FLOAT, "float16": trt.DataType.HALF}
        for spec in self.specs:
            weights = trt.Weights(types[spec.dtype.name], self._buffers[spec.key], spec.size)
            if not self.refitter.set_named_weights(spec.key, weights, trt.TensorLocation.DEVICE):
                raise ArtifactError(f"TensorRT engine refuses refit weights {spec.key!r}; re-export the bundle")

    def read_base(self, spec: TensorSpec, out: np.ndarray) -> None:
        if spec.perm is None:
            self.weights.read_into(spec.tensor, out)
            return
        source = np.empty([out.shape[spec.perm.index(axis)] for axis in range(out.ndim)], out.dtype)
        self.weights.read_into(spec.tensor, source)
        out[...] = np.transpose(source, spec.perm)

    def _memcpy(self, dst: int, src: int, nbytes: int, kind: Any) -> None:
        _check(self.cudart, self.cudart.cudaMemcpyAsync(dst, src, nbytes, kind, self.stream))

    def _activate(self, lease: Lease) -> None:
        if self._active == (lease.slot, lease.generation):
            return
        h2d = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        for spec in self.specs:
            array = lease.arrays[spec.key]
            self._memcpy(self._buffers[spec.key], array.ctypes.data, array.nbytes, h2d)
        if self.refitter.get_missing_weights():
            self._register()
        if not self.refitter.refit_cuda_engine_async(int(self.stream)):
            raise InternalError(f"TensorRT refit failed (missing: {self.refitter.get_missing_weights()})")
        self._active = (lease.slot, lease.generation)

    def prepare(self, lease: Lease) -> None:
        """Refit the engine to the lease's weights now (so a switch is complete when it returns)."""
        self._activate(lease)
        _check(self.cudart, self.cudart.cudaStreamSynchronize(self.stream))

    def run(self, batch: np.ndarray, lease: Lease) -> np.ndarray:
        cudart = self.cudart
        self._activate(lease)  # queued on the run stream, so the run below sees the new weights
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        n = batch.shape[0]
        self.context.set_input_shape(self.input_name, tuple(batch.shape))
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
        cudart.cudaStreamSynchronize(self.stream)
        for pointer in [*self._buffers.values(), getattr(self, "_image", 0), getattr(self, "_embedding", 0)]:
            if pointer:
                cudart.cudaFree(pointer)
        cudart.cudaStreamDestroy(self.stream)
        self._buffers, self.stream = {}, None
        self.refitter = self.context = self.engine = None
