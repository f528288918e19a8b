"""`rmt-deploy inspect`: summarise a .rmtask file or, through inspect_bundle, a bundle (numpy only)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from rmt_deploy.errors import ArtifactError, InputError
from rmt_deploy.fingerprint import short
from rmt_deploy.heads import head_nbytes
from rmt_deploy.masks import entropy_bound_for, mask_stats
from rmt_deploy.taskpack import read_encoded


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


def _format(summary: dict[str, Any]) -> str:
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


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--verify", is_flag=True,
              help="Bundle only: check every file's size and sha256 and read every task; exit 1 on any failure.")
def inspect(path: Path, as_json: bool, verify: bool) -> None:
    """Summarise a .rmtask file or a bundle directory (tasks, base, files; --verify checks all hashes)."""
    if path.is_dir():
        from rmt_deploy.inspect_bundle import format_bundle, summarize_bundle

        summary = summarize_bundle(path, verify=verify)
        click.echo(json.dumps(summary, indent=2) if as_json else format_bundle(summary))
        failures = summary.get("verification", {}).get("failures", {})
        if failures:
            first = next(iter(failures.items()))
            raise ArtifactError(f"{path}: {len(failures)} file(s) failed verification; first: {first[1]}")
        return
    if verify:
        raise InputError("--verify checks a bundle directory; a .rmtask file is always checked when read")
    summary = summarize(path)
    click.echo(json.dumps(summary, indent=2) if as_json else _format(summary))
