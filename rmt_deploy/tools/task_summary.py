"""What a .rmtask file holds, for people: classes, base, head, sparsity, stored bytes vs the entropy bound (numpy only)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rmt_deploy.artifacts.fingerprint import short
from rmt_deploy.artifacts.heads import head_nbytes
from rmt_deploy.artifacts.masks import entropy_bound_for, mask_stats
from rmt_deploy.artifacts.task_file import read_encoded


def summarize(path: str | Path) -> dict[str, Any]:
    """A JSON-able summary of a task pack: task, classes, base, masks and their storage."""
    encoded = read_encoded(path)
    meta = encoded.meta
    tensors = []
    for name, blob in encoded.blobs.items():
        stats = mask_stats(blob)
        tensors.append({
            "name": name,
            "shape": list(stats.shape),
            "size": stats.size,
            "zeros": stats.zeros,
            "sparsity": stats.zeros / stats.size if stats.size else 0.0,
            "stored_bytes": len(blob),
            "entropy_bound_bytes": entropy_bound_for(stats.size, stats.zeros),
            "packbits_bytes": (stats.size + 7) // 8,
            "method": stats.method,
        })
    masked = sum(t["size"] for t in tensors)
    return {
        "path": str(path),
        "task": encoded.name,
        "classes": list(meta["class_names"]),
        "template": meta.get("template", ""),
        "model": meta["model_name"],
        "fingerprint": encoded.base_fingerprint,
        "logit_scale": float(meta["logit_scale"]),
        "format_version": meta["version"],
        "head": _head(encoded),
        "sparsity": sum(t["zeros"] for t in tensors) / masked if masked else 0.0,
        "masked_weights": masked,
        "stored_bytes": sum(t["stored_bytes"] for t in tensors),
        "entropy_bound_bytes": sum(t["entropy_bound_bytes"] for t in tensors),
        "packbits_bytes": sum(t["packbits_bytes"] for t in tensors),
        "file_bytes": Path(path).stat().st_size,
        "tensors": tensors,
        "metrics": meta.get("metrics", {}),
        "hyperparameters": meta.get("hyperparameters", {}),
    }


def _head(encoded: Any) -> dict[str, Any]:
    """The head's kind, shape and bytes (text features, and Tip-Adapter's cache)."""
    head = {"kind": encoded.head_kind, "text_shape": list(encoded.head.shape), "text_bytes": int(encoded.head.nbytes),
            "bytes": head_nbytes(encoded.head, encoded.cache)}
    cache = encoded.cache
    if cache is not None:
        head.update(alpha=cache.alpha, beta=cache.beta, cache_keys=int(cache.labels.size),
                    cache_keys_dtype=str(cache.keys.dtype), cache_bytes=cache.nbytes)
    return head


def _head_line(head: dict[str, Any]) -> str:
    line = (f"head         {head['kind']}: text {'x'.join(map(str, head['text_shape']))} float32 "
            f"({head['text_bytes']:,} bytes)")
    if "cache_keys" in head:
        line += (f" + cache {head['cache_keys']} keys {head['cache_keys_dtype']} with labels "
                 f"({head['cache_bytes']:,} bytes), alpha {head['alpha']:.4g}, beta {head['beta']:.4g}")
    return line + f"; {head['bytes']:,} bytes in all"


def format_task(summary: dict[str, Any]) -> str:
    classes = summary["classes"]
    shown = ", ".join(classes[:8]) + (f", ... ({len(classes)} total)" if len(classes) > 8 else "")
    lines = [
        f"task         {summary['task']}",
        f"classes      {len(classes)}: {shown}",
        f"model        {summary['model']}  base {short(summary['fingerprint'])}",
        f"file         {summary['file_bytes']:,} bytes (format version {summary['format_version']})",
        _head_line(summary["head"]),
        f"masks        {summary['masked_weights']:,} weights, {100 * summary['sparsity']:.2f}% zeros",
        f"mask bytes   stored {summary['stored_bytes']:,} | entropy bound "
        f"{summary['entropy_bound_bytes']:,.0f} | bit-packed {summary['packbits_bytes']:,}",
        "",
        f"{'tensor':<52} {'shape':>12} {'zeros %':>8} {'bytes':>10} {'bound':>10}",
    ]
    for t in summary["tensors"]:
        shape = "x".join(map(str, t["shape"]))
        lines.append(f"{t['name']:<52} {shape:>12} {100 * t['sparsity']:>8.2f} "
                     f"{t['stored_bytes']:>10,} {t['entropy_bound_bytes']:>10,.0f}")
    if summary["metrics"]:
        lines.append("")
        lines.append("metrics      " + ", ".join(f"{k}={_short_value(v)}" for k, v in summary["metrics"].items()
                                                 if not isinstance(v, (dict, list))))
    return "\n".join(lines)


def _short_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
