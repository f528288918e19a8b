"""rmt-deploy's Prometheus metrics on Triton's metrics port, through the Python backend's custom-metrics API.

    rmt_task_requests_total{model, task}     samples answered, per task
    rmt_request_errors_total{model}          requests refused (bad input) or failed
    rmt_task_pool_hits_total{model}          task switches served from a resident buffer
    rmt_task_pool_misses_total{model}        task switches that rewrote a buffer in place
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence


class ServingMetrics:
    """Counters registered with Triton (pb_utils.MetricFamily), fed after every execute()."""

    def __init__(self, pb_utils: Any, model: str):
        family = pb_utils.MetricFamily
        self._labels = {"model": model}
        self._requests = family(name="rmt_task_requests_total", description="samples answered, per task",
                                kind=family.COUNTER)
        # a MetricFamily must outlive its Metrics: keep every family referenced
        self._families = [family(name="rmt_request_errors_total", description="requests refused or failed",
                                 kind=family.COUNTER)]
        self._errors = self._families[0].Metric(labels=self._labels)
        self._pool = {}
        for key in ("hits", "misses"):
            self._families.append(family(name=f"rmt_task_pool_{key}_total", kind=family.COUNTER,
                                         description=f"task pool {key} (cached switches / in-place rewrites)"))
            self._pool[key] = self._families[-1].Metric(labels=self._labels)
        self._per_task: dict[str, Any] = {}
        self._seen = {"hits": 0, "misses": 0}

    def record(self, samples: Sequence[Sequence[Any] | None], errors: int, cache_stats: Mapping[str, int]) -> None:
        """Count one execute(): samples of the decoded requests by task, errors, pool counter deltas."""
        counts: dict[str, int] = {}
        for request in samples:
            for sample in request or ():
                counts[sample.task] = counts.get(sample.task, 0) + 1
        for task, n in counts.items():
            metric = self._per_task.get(task)
            if metric is None:
                metric = self._per_task[task] = self._requests.Metric(labels={**self._labels, "task": task})
            metric.increment(n)
        if errors:
            self._errors.increment(errors)
        for key, metric in self._pool.items():
            now = int(cache_stats.get(key, 0))
            if now > self._seen[key]:
                metric.increment(now - self._seen[key])
            self._seen[key] = now
