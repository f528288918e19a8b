"""ONNX Runtime backend: the shared base.onnx, masked weights fed per run.

base.onnx takes the masked weights as required graph inputs (no initializer
defaults, so the session never holds a copy of them); their base values live in the
bundle's weights file and are read once into the pool. On CPU a run feeds the leased
buffers as numpy arrays (no copy). On CUDA each pool slot gets device OrtValues,
refreshed (`update_inplace`) only when the slot is rewritten, and bound with IOBinding,
so a cached switch is a rebind. Runs may overlap: each has its own feeds or binding.
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np

from rmt_deploy.bundle import Bundle
from rmt_deploy.errors import ArtifactError, MissingDependencyError, require
from rmt_deploy.runtime.backends import CUDA_EP, parse_device
from rmt_deploy.runtime.baseweights import SafetensorsReader
from rmt_deploy.runtime.taskpool import Lease, TensorSpec

def onnx_files(bundle: Bundle) -> dict[str, Any]:
    files = bundle.manifest.files.get("onnx")
    if not isinstance(files, dict) or "base" not in files:
        raise ArtifactError(f"bundle {bundle.root} has no shared ONNX model; export it with --mode shared or both")
    return files


def weights_file(bundle: Bundle, files: dict[str, Any]) -> str:
    """The bundle-relative path of the base-values file of the masked tensors."""
    for name in (getattr(bundle.manifest, "base_weights", None), files.get("base_weights")):
        if isinstance(name, str) and name:
            return name
    raise ArtifactError(f"bundle {bundle.root}: the manifest names no base weights file for the shared "
                        "ONNX model; re-export the bundle")


class OrtBackend:
    """InferenceSession on base.onnx; CPU feeds numpy buffers, CUDA binds device OrtValues."""

    concurrent = True

    def __init__(self, bundle: Bundle, device: str, threads: int | None):
        ort = require("onnxruntime", "onnx")
        self.ort = ort
        kind, index = parse_device(device)
        if kind == "cuda" and CUDA_EP not in ort.get_available_providers():
            raise MissingDependencyError(
                f"this onnxruntime has no CUDA execution provider (has: {', '.join(ort.get_available_providers())}); "
                "install it with: pip install 'rmt-deploy[gpu]'"
            )
        self.kind, self.device_id = kind, index
        self.name = f"onnxruntime-{kind}"
        manifest = bundle.manifest
        files = onnx_files(bundle)
        model_path = bundle.file(files["base"])
        self.weights = SafetensorsReader(bundle.file(weights_file(bundle, files)))
        self.base_file = self.weights.path
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        providers = [(CUDA_EP, {"device_id": index}), "CPUExecutionProvider"] if kind == "cuda" else \
            ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for damaged or invalid models
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise ArtifactError(f"{model_path}: ONNX Runtime cannot load it ({first}); re-export the bundle") from None
        self.input_name, self.output_name = manifest.input_name, manifest.output_name
        self.specs = [TensorSpec(t.input_name, tuple(t.shape), np.dtype(t.dtype), t.name)
                      for t in manifest.masked_tensors]
        self._check_graph(model_path)
        self._lock = threading.Lock()
        self._device_slots: dict[int, tuple[int, dict[str, Any]]] = {}

    def _check_graph(self, path: Any) -> None:
        # inputs with initializer defaults ("defaults" bundles) are listed as overridable initializers
        inputs = {i.name: i for i in self.session.get_inputs() + self.session.get_overridable_initializers()}
        outputs = {o.name for o in self.session.get_outputs()}
        expected = [self.input_name] + [s.key for s in self.specs]
        missing = [n for n in expected if n not in inputs]
        if missing or self.output_name not in outputs or len(inputs) != len(expected):
            raise ArtifactError(
                f"{path}: graph inputs {sorted(inputs)[:4]}... / outputs {sorted(outputs)} do not match the "
                f"manifest (missing {missing[:3]}, output {self.output_name!r}); re-export the bundle"
            )
        for spec in self.specs:
            shape = inputs[spec.key].shape
            if list(shape) != list(spec.shape):
                raise ArtifactError(f"{path}: input {spec.key!r} has shape {shape}, manifest says "
                                    f"{list(spec.shape)}; re-export the bundle")

    def read_base(self, spec: TensorSpec, out: np.ndarray) -> None:
        self.weights.read_into(spec.tensor if spec.tensor in self.weights.entries else spec.key, out)

    def prepare(self, lease: Lease) -> None:
        """On CUDA, copy a rewritten slot to its device OrtValues now; on CPU there is nothing to do."""
        if self.kind == "cuda":
            self._device_values(lease)

    def run(self, batch: np.ndarray, lease: Lease) -> np.ndarray:
        if self.kind == "cpu":
            feeds = dict(lease.arrays)
            feeds[self.input_name] = batch
            return self.session.run([self.output_name], feeds)[0]
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, batch)
        for key, value in self._device_values(lease).items():
            binding.bind_ortvalue_input(key, value)
        binding.bind_output(self.output_name, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def _device_values(self, lease: Lease) -> dict[str, Any]:
        """The slot's weights as CUDA OrtValues, copied from the host buffer when the slot changed."""
        with self._lock:
            generation, values = self._device_slots.get(lease.slot, (None, None))
            if generation == lease.generation:
                return values
            if values is None:
                values = {k: self.ort.OrtValue.ortvalue_from_numpy(a, "cuda", self.device_id)
                          for k, a in lease.arrays.items()}
            else:
                for key, array in lease.arrays.items():
                    values[key].update_inplace(array)
            self._device_slots[lease.slot] = (lease.generation, values)
            return values

    def close(self) -> None:
        self._device_slots.clear()
        self.session = None
