"""torch backend: the open_clip model with the masked weights swapped in (w = base * mask).

Needs the `train` extra. The base is rebuilt from the bundle's (model name, pretrained)
and must match the bundle's fingerprint. On CPU the masked parameters alias the pool's
buffers (a switch swaps 24 pointers for ViT-B/16); on CUDA each pool slot has a device
copy, refreshed by one host-to-device copy when the slot is rewritten.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from rmt_deploy.artifacts.bundle import Bundle
from rmt_deploy.artifacts.fingerprint import short
from rmt_deploy.errors import ArtifactError, IncompatibleBaseError, MissingDependencyError, require
from rmt_deploy.runtime.backends.contract import NoBackgroundWork, parse_device
from rmt_deploy.runtime.buffer_pool import Lease, TensorSpec


class TorchBackend(NoBackgroundWork):
    """open_clip encode_image on CPU or CUDA; runs are serialised (one set of parameters)."""

    concurrent = False

    def __init__(self, bundle: Bundle, device: str, threads: int | None):
        self.torch = require("torch", "train")
        from rmt_deploy.basemodel.loading import fingerprint, load_base

        kind, index = parse_device(device)
        if kind == "cuda" and not self.torch.cuda.is_available():
            raise MissingDependencyError("torch reports no CUDA device: use device='cpu' or install a CUDA build "
                                         "of torch")
        self.device = self.torch.device("cpu" if kind == "cpu" else f"cuda:{index}")
        self.name = f"torch-{kind}"
        if threads is not None:
            self.torch.set_num_threads(threads)
        manifest = bundle.manifest
        model = load_base(manifest.model_name, manifest.pretrained, device=str(self.device),
                          quick_gelu=manifest.quick_gelu).model  # the activation the bundle was exported with
        params = dict(model.named_parameters())
        missing = [t.name for t in manifest.masked_tensors if t.name not in params]
        if missing:
            raise ArtifactError(f"bundle masks {missing[:3]}, which {manifest.model_name} does not have")
        self.params = {t.name: params[t.name] for t in manifest.masked_tensors}
        found = fingerprint(manifest.model_name, self.params)
        if found != manifest.fingerprint:
            raise IncompatibleBaseError(
                f"weights {manifest.pretrained!r} give base {short(found)}, the bundle was exported from "
                f"{short(manifest.fingerprint)}: pass the checkpoint the bundle was exported from"
            )
        self.model = model.eval()
        self.base_file = None  # the base comes from the model, fingerprint-checked above
        self.specs = [TensorSpec(n, tuple(p.shape), np.dtype(str(p.dtype).replace("torch.", "")), n)
                      for n, p in self.params.items()]
        self._active: tuple[int, int] | None = None
        self._device_slots: dict[int, tuple[int, dict[str, Any]]] = {}

    def fill_base(self, arrays: dict[str, np.ndarray]) -> None:
        """The model's own values of the masked parameters (fingerprint-checked at load)."""
        for spec in self.specs:
            arrays[spec.key][...] = self.params[spec.key].detach().cpu().numpy()

    def _activate(self, lease: Lease) -> None:
        if self._active == (lease.slot, lease.generation):
            return
        torch = self.torch
        if self.device.type == "cpu":
            tensors = {k: torch.from_numpy(a) for k, a in lease.arrays.items()}
        else:
            generation, tensors = self._device_slots.get(lease.slot, (None, None))
            if generation != lease.generation:
                if tensors is None:
                    tensors = {k: torch.empty(a.shape, dtype=self.params[k].dtype, device=self.device)
                               for k, a in lease.arrays.items()}
                for key, array in lease.arrays.items():
                    tensors[key].copy_(torch.from_numpy(array))
                self._device_slots[lease.slot] = (lease.generation, tensors)
        for key, param in self.params.items():
            param.data = tensors[key]
        self._active = (lease.slot, lease.generation)

    def prepare(self, lease: Lease) -> None:
        """Point the model at the lease's weights (a device copy on CUDA if the slot changed)."""
        if self.device.type == "cuda":
            with self.torch.no_grad():
                self._activate(lease)
            self.torch.cuda.synchronize(self.device)

    def run(self, batch: np.ndarray, lease: Lease) -> np.ndarray:
        torch = self.torch
        with torch.no_grad():
            self._activate(lease)
        with torch.inference_mode():
            image = torch.from_numpy(batch).to(self.device)
            embedding = self.model.encode_image(image, normalize=True)
            return embedding.float().cpu().numpy()

    def close(self) -> None:
        self._device_slots.clear()
        self.params, self.model = {}, None
