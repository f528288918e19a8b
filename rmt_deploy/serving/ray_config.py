"""RayServeConfig: what one Ray Serve application over a bundle needs, checked, and read from
`serve run ... key=value` arguments (all strings) or from the `rmt-deploy serve` options.

No Ray import here: the config is validated before a cluster is touched.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from rmt_deploy.errors import InputError

__all__ = ["RayServeConfig"]

ROUTINGS = ("multiplexed", "round_robin")


@dataclass(frozen=True)
class RayServeConfig:
    """One Ray Serve application: a KServe v2 ingress in front of `replicas` Engine replicas."""

    bundle: str
    replicas: int = 1                      # fixed replica count (ignored when autoscaling)
    cache_tasks: int = 2                   # dense task buffers per replica == multiplexed models per replica
    min_replicas: int | None = None        # autoscaling when max_replicas is set
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0   # autoscaling target per replica
    max_ongoing_requests: int = 8          # per replica; more wait in the router
    replica_cpus: float = 1.0              # Ray CPUs per replica (fractions are fine)
    replica_gpus: float = 0.0              # Ray GPUs per replica (with device="cuda")
    ingress_cpus: float = 0.0
    threads: int | None = None             # intra-op threads per Engine (default: ONNX Runtime's)
    backend: str = "auto"
    device: str = "cpu"
    top_k: int = 5
    max_image_pixels: int = 4096 * 4096    # per image, raw or decoded (protocol.ImageLimits)
    max_request_bytes: int = 256 << 20     # per HTTP request body
    model_name: str = "rmt"
    routing: str = "multiplexed"           # or "round_robin": task-blind, for replicas that hold every task
    app_name: str = "rmt"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # unknown keys, kept for the warning

    def __post_init__(self) -> None:
        _positive_int("replicas", self.replicas)
        _positive_int("cache_tasks", self.cache_tasks)
        _positive_int("max_ongoing_requests", self.max_ongoing_requests)
        _positive_int("top_k", self.top_k)
        _positive_int("max_image_pixels", self.max_image_pixels)
        _positive_int("max_request_bytes", self.max_request_bytes)
        if self.threads is not None:
            _positive_int("threads", self.threads)
        if not isinstance(self.bundle, str) or not self.bundle:
            raise InputError(f"bundle={self.bundle!r}: give the bundle directory, e.g. bundle=PATH")
        if min(self.replica_cpus, self.ingress_cpus, self.replica_gpus) < 0:
            raise InputError(f"replica_cpus={self.replica_cpus}, replica_gpus={self.replica_gpus}, "
                             f"ingress_cpus={self.ingress_cpus}: resource shares must be >= 0")
        if self.routing not in ROUTINGS:
            raise InputError(f"routing={self.routing!r} is not one of {', '.join(ROUTINGS)}")
        if not self.model_name or "/" in self.model_name:
            raise InputError(f"model_name={self.model_name!r} must be a non-empty name without '/'")
        if self.min_replicas is not None and self.max_replicas is None:
            raise InputError(f"min_replicas={self.min_replicas} needs max_replicas=N too (autoscaling range)")
        if self.max_replicas is not None:
            _positive_int("max_replicas", self.max_replicas)
            low = 1 if self.min_replicas is None else self.min_replicas
            if not isinstance(low, int) or isinstance(low, bool) or low < 0 or low > self.max_replicas:
                raise InputError(f"min_replicas={self.min_replicas!r} must be an integer in "
                                 f"[0, max_replicas={self.max_replicas}]")
            if not self.target_ongoing_requests > 0:
                raise InputError(f"target_ongoing_requests={self.target_ongoing_requests} must be > 0")

    @property
    def autoscaling(self) -> dict[str, Any] | None:
        """Ray Serve's autoscaling_config, or None for a fixed replica count."""
        if self.max_replicas is None:
            return None
        return {"min_replicas": 1 if self.min_replicas is None else self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests}

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("extra")
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RayServeConfig":
        """From typed values or from `serve run` strings ("2", "0.5", "none"); unknown keys are kept
        in `extra` (the app builder warns about them) rather than refused."""
        known = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
        if "bundle" not in data:
            raise InputError("no bundle given: serve run rmt_deploy.serving.ray:app bundle=PATH [replicas=2 ...]")
        values, extra = {}, {}
        for key, value in data.items():
            if key not in known:
                extra[key] = value
                continue
            values[key] = _coerce(key, value, known[key].type)
        return cls(**values, extra=extra)


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"{name}={value!r} must be an integer >= 1")


def _coerce(key: str, value: Any, annotation: str) -> Any:
    """A `serve run` string -> the field's type (annotations are strings under `from __future__`)."""
    if not isinstance(value, str) or annotation == "str":
        return value
    if "None" in annotation and value.lower() in ("", "none", "null"):
        return None
    kind = annotation.split("|")[0].strip()
    try:
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
    except ValueError:
        raise InputError(f"{key}={value!r} is not a{'n integer' if kind == 'int' else ' number'}") from None
    return value
