"""ONNX Runtime backend: the shared base.onnx, masked weights fed per run.

base.onnx takes the masked weights as required graph inputs (no initializer
defaults, so the session never holds a copy of them); their base values live in the
bundle's weights file and are read once into the pool. On CPU each pool slot gets
IOBindings whose weight inputs are OrtValues over the slot's own buffers (no copy), made
when the slot is rewritten and reused by every later run: a run binds only its image
(ONNX Runtime converts no weight input per call, which measured faster than feeding
numpy arrays, and faster than the folded model's plain run on small towers; see
benchmarks/small_model_overhead.py). On CUDA each slot gets device OrtValues, refreshed
(`update_inplace`) only when the slot is rewritten, so a cached switch is a rebind.
Runs may overlap: each takes its own binding. On CPU a resident task also gets a constant session
(backends.constant_sessions) once the background worker has made it; its runs then use that.
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np

from rmt_deploy.artifacts.bundle import Bundle
from rmt_deploy.artifacts.integrity import REBUILD, BackgroundHash
from rmt_deploy.errors import ArtifactError, MissingDependencyError, RmtError, require
from rmt_deploy.runtime.backends.constant_sessions import ConstantSessions
from rmt_deploy.runtime.backends.contract import CUDA_EP, parse_device
from rmt_deploy.runtime.baseweights import SafetensorsReader
from rmt_deploy.runtime.buffer_pool import Lease, TaskPool, TensorSpec

_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _graph_files(bundle: Bundle, base: str) -> list[str]:
    """The shared graph and its external data file, if the bundle records one."""
    data = base + ".data"
    return [base, data] if data in bundle.manifest.checksums else [base]


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
        self.model_path = model_path
        weights_relative = weights_file(bundle, files)
        self.weights = SafetensorsReader(bundle.file(weights_relative))
        self.weights_record = bundle.record(weights_relative)
        self.base_file = self.weights.path
        self.input_name, self.output_name = manifest.input_name, manifest.output_name
        self.specs = [TensorSpec(t.input_name, tuple(t.shape), np.dtype(t.dtype), t.name)
                      for t in manifest.masked_tensors]
        for spec in self.specs:  # the weights file must hold every tensor as declared, before any allocation
            self.weights.entry(self._weights_name(spec), spec.dtype, spec.shape)
        hashes = [BackgroundHash(bundle.file(rel), bundle.record(rel)) for rel in _graph_files(bundle, files["base"])]
        self._constant_graph = (bundle.file(files["constant"]), bundle.record(files["constant"])) \
            if kind == "cpu" and "constant" in files else None
        self._constant: ConstantSessions | None = None
        self._constant_absent = "this bundle has no constant graph (re-export it to get one)" if kind == "cpu" \
            else "ONNX Runtime makes constant sessions on CPU only"
        self._threads = threads
        options = self._options()
        providers = [(CUDA_EP, {"device_id": index}), "CPUExecutionProvider"] if kind == "cuda" else \
            ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for damaged or invalid models
            for digest in hashes:
                digest.check()  # a damaged file is named as such, not by ORT's parse error
            raise ArtifactError(f"{model_path}: ONNX Runtime cannot load it ({_first_line(exc)}); "
                                f"{REBUILD}") from None
        for digest in hashes:
            digest.check()
        self._check_graph(model_path)
        self._lock = threading.Lock()
        self._device_slots: dict[int, tuple[int, dict[str, Any]]] = {}
        self._idle_bindings: dict[int, tuple[int, list[Any]]] = {}  # slot -> (generation, its IOBindings not in use)

    def _options(self) -> Any:
        options = self.ort.SessionOptions()
        if self._threads is not None:
            options.intra_op_num_threads = self._threads
        return options

    def attach_pool(self, pool: TaskPool, constant_sessions: int) -> None:
        """On CPU, with a bundle that has the constant graph: make up to `constant_sessions` constant sessions
        over the pool's slots."""
        if not constant_sessions:
            self._constant_absent = "turned off (Engine.load(..., constant_sessions=0))"
        elif self._constant_graph is not None:
            self._constant = ConstantSessions(*self._constant_graph, self._constant_session, pool,
                                              int(constant_sessions))

    def wait_background(self, timeout: float | None) -> bool:
        return self._constant is None or self._constant.wait(timeout)

    @property
    def constant_stats(self) -> dict[str, Any]:
        """Constant sessions: whether on, how many are ready now, how many were made, why off."""
        held = self._constant
        if held is None:
            return {"on": False, "ready": 0, "made": 0, "limit": 0, "off_because": self._constant_absent}
        return {"on": held.off is None, "ready": held.ready_count(), "made": held.made, "limit": held.limit,
                "off_because": held.off}

    def _constant_session(self, graph: bytes, arrays: dict[str, np.ndarray]) -> Any:
        """A session on the constant graph whose masked initializers are `arrays` (read in place)."""
        options = self._options()
        values = {key: self.ort.OrtValue.ortvalue_from_numpy(array) for key, array in arrays.items()}
        options.add_external_initializers(list(values), list(values.values()))
        session = self.ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        inputs, outputs = session.get_inputs(), [o.name for o in session.get_outputs()]
        if [i.name for i in inputs] != [self.input_name] or self.output_name not in outputs:
            raise ArtifactError(f"the constant graph's inputs {[i.name for i in inputs][:3]} / outputs {outputs} are "
                                f"not the shared graph's ({self.input_name!r} -> {self.output_name!r}); {REBUILD}")
        session.supplied_values = values  # the session reads these buffers: they live as long as it does
        return session

    def _check_graph(self, path: Any) -> None:
        """Graph inputs and outputs (names, shapes, dtypes) must be the ones the manifest describes."""
        # inputs with initializer defaults ("defaults" bundles) are listed as overridable initializers
        inputs = {i.name: i for i in self.session.get_inputs() + self.session.get_overridable_initializers()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        expected = [self.input_name] + [s.key for s in self.specs]
        missing = [n for n in expected if n not in inputs]
        if missing or self.output_name not in outputs or len(inputs) != len(expected):
            raise ArtifactError(
                f"{path}: graph inputs {sorted(inputs)[:4]}... / outputs {sorted(outputs)} do not match the "
                f"manifest (missing {missing[:3]}, output {self.output_name!r}); {REBUILD}"
            )
        declared = {s.key: (list(s.shape), s.dtype) for s in self.specs}
        for name, (shape, dtype) in declared.items():
            found = inputs[name]
            if list(found.shape) != shape or found.type != _ORT_TYPES.get(dtype.name):
                raise ArtifactError(f"{path}: input {name!r} is {found.type} {found.shape}, the manifest says "
                                    f"{dtype.name} {shape}; {REBUILD}")
        for node, what in ((inputs[self.input_name], "input"), (outputs[self.output_name], "output")):
            if node.type != "tensor(float)":
                raise ArtifactError(f"{path}: {what} {node.name!r} is {node.type}, expected tensor(float); {REBUILD}")

    def _weights_name(self, spec: TensorSpec) -> str:
        return spec.tensor if spec.tensor in self.weights.entries else spec.key

    def fill_base(self, arrays: dict[str, np.ndarray]) -> str:
        """Read the base values into the pool's first buffers, hashing the file as it is read;
        returns the file's sha256 (already checked against the manifest's record, if it has one)."""
        outs = {self._weights_name(spec): arrays[spec.key] for spec in self.specs}
        return self.weights.read_all_into(outs, self.weights_record)

    def prepare(self, lease: Lease) -> None:
        """On CUDA, copy a rewritten slot to its device OrtValues now; on CPU there is nothing to do."""
        if self.kind == "cuda":
            self._device_values(lease)

    def run(self, batch: np.ndarray, lease: Lease) -> np.ndarray:
        try:
            return self._run(batch, lease)
        except Exception as exc:  # noqa: BLE001 - inputs were validated: a failure here is the model's
            if isinstance(exc, RmtError):
                raise
            raise ArtifactError(f"{self.model_path}: ONNX Runtime failed to run it ({_first_line(exc)}); "
                                f"the bundle may be damaged: check it with `rmt-deploy inspect "
                                f"{self.model_path.parent} --verify`") from None

    def _run(self, batch: np.ndarray, lease: Lease) -> np.ndarray:
        if self.kind == "cpu":
            return self._run_cpu(batch, lease)
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, batch)
        for key, value in self._device_values(lease).items():
            binding.bind_ortvalue_input(key, value)
        binding.bind_output(self.output_name, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def _run_cpu(self, batch: np.ndarray, lease: Lease) -> np.ndarray:
        constant = self._constant.session(lease) if self._constant is not None else None
        if constant is not None:
            return constant.run([self.output_name], {self.input_name: batch})[0]
        binding = self._take_binding(lease)
        try:
            binding.bind_cpu_input(self.input_name, batch)
            binding.bind_output(self.output_name)
            self.session.run_with_iobinding(binding)
            return binding.get_outputs()[0].numpy()
        finally:
            binding.clear_binding_outputs()
            with self._lock:  # a slot is rewritten only once no lease holds it: older runs have all ended
                generation, idle = self._idle_bindings.get(lease.slot, (None, []))
                if generation != lease.generation:
                    idle = []
                    self._idle_bindings[lease.slot] = (lease.generation, idle)
                idle.append(binding)

    def _take_binding(self, lease: Lease) -> Any:
        """An idle binding of the lease's slot and generation, else a new one over the slot's buffers."""
        with self._lock:
            generation, idle = self._idle_bindings.get(lease.slot, (None, []))
            if generation == lease.generation and idle:
                return idle.pop()
        binding = self.session.io_binding()
        for key, array in lease.arrays.items():
            binding.bind_ortvalue_input(key, self.ort.OrtValue.ortvalue_from_numpy(array))
        return binding

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
        if self._constant is not None:
            self._constant.close()
        self._device_slots.clear()
        self._idle_bindings.clear()
        self.session = None
