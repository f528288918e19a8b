"""`rmt-deploy inspect BUNDLE`: summarise a bundle directory, and with --verify check every file (numpy only)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rmt_deploy.artifacts.bundle import Bundle
from rmt_deploy.artifacts.fingerprint import short
from rmt_deploy.artifacts.masks import mask_stats
from rmt_deploy.errors import ArtifactError


def summarize_bundle(root: str | Path, verify: bool = False) -> dict[str, Any]:
    """A JSON-able summary of a bundle; with `verify`, every recorded file's size and sha256 are
    checked and every task file is read and checked (name, fingerprint, mask shapes)."""
    bundle = Bundle.open(root)
    manifest = bundle.manifest
    summary: dict[str, Any] = {
        "path": str(root),
        "format_version": manifest.version,
        "verified_format": manifest.verified,
        "model": manifest.model_name,
        "pretrained": manifest.pretrained,
        "quick_gelu": manifest.quick_gelu,
        "fingerprint": manifest.fingerprint,
        "precision": manifest.precision,
        "image_size": list(manifest.preprocess.image_size),
        "embed_dim": manifest.embed_dim,
        "max_batch": manifest.max_batch,
        "masked_tensors": len(manifest.masked_tensors),
        "masked_weights": sum(_size(t.shape) for t in manifest.masked_tensors),
        "backends": _backends(manifest),
        "tasks": [{"name": t, "bytes": _recorded_size(bundle, bundle.task_relative(t))} for t in manifest.tasks],
        "files": [{"path": p, "bytes": r.size, "sha256": r.sha256} for p, r in manifest.checksums.items()],
        "total_bytes": sum(r.size for r in manifest.checksums.values()),
    }
    if verify:
        summary["verification"] = _verify(bundle, summary)
    return summary


def _size(shape: list[int]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def _recorded_size(bundle: Bundle, relative: str) -> int | None:
    record = bundle.manifest.checksums.get(relative)
    return record.size if record is not None else None


def _backends(manifest: Any) -> dict[str, Any]:
    out = {}
    for backend, entry in manifest.files.items():
        out[backend] = {"shared": "base" in entry, "constant": "constant" in entry,
                        "folded": sorted(entry.get("folded", {}))}
    if manifest.tensorrt:
        gpu = manifest.tensorrt.get("gpu")
        out.setdefault("tensorrt", {})["built_for"] = {
            "gpu": gpu.get("name") if isinstance(gpu, dict) else None,
            "tensorrt": manifest.tensorrt.get("version")}
    return out


def _verify(bundle: Bundle, summary: dict[str, Any]) -> dict[str, Any]:
    failures = {path: error for path, error in bundle.verify() if error is not None}
    shapes = {t.name: tuple(t.shape) for t in bundle.manifest.masked_tensors}
    for entry in summary["tasks"]:
        try:
            encoded = bundle.read_task(entry["name"])
            if encoded.base_fingerprint != bundle.manifest.fingerprint:
                raise ArtifactError(f"task {entry['name']!r} was trained on base {short(encoded.base_fingerprint)}, "
                                    f"not this bundle's {short(bundle.manifest.fingerprint)}")
            if encoded.mask_shapes != shapes:
                raise ArtifactError(f"task {entry['name']!r} masks other tensors than this bundle")
            stats = [mask_stats(blob) for blob in encoded.blobs.values()]
            masked = sum(s.size for s in stats)
            entry.update(classes=len(encoded.meta["class_names"]),
                         sparsity=sum(s.zeros for s in stats) / masked if masked else 0.0)
        except ArtifactError as exc:
            failures.setdefault(bundle.task_relative(entry["name"]), str(exc))
    return {"files_checked": len(bundle.manifest.checksums), "tasks_checked": len(summary["tasks"]),
            "failures": failures, "ok": not failures}


def format_bundle(summary: dict[str, Any]) -> str:
    """The summary as the text `rmt-deploy inspect BUNDLE` prints."""
    tasks = summary["tasks"]
    shown = ", ".join(t["name"] for t in tasks[:8]) + (f", ... ({len(tasks)} total)" if len(tasks) > 8 else "")
    backends = "; ".join(f"{name}: {'shared' if b.get('shared') else ''}"
                         f"{' + ' if b.get('shared') and b.get('folded') else ''}"
                         f"{'folded ' + str(len(b['folded'])) if b.get('folded') else ''}"
                         for name, b in summary["backends"].items())
    lines = [
        f"bundle       {summary['path']} (format v{summary['format_version']}"
        f"{'' if summary['verified_format'] else ', unverified: no file hashes'})",
        f"model        {summary['model']}  base {short(summary['fingerprint'])}  {summary['precision']}"
        f"{'  quick_gelu' if summary['quick_gelu'] else ''}",
        f"input        {'x'.join(map(str, summary['image_size']))}, max batch {summary['max_batch']}, "
        f"embedding {summary['embed_dim']}",
        f"masks        {summary['masked_tensors']} tensors, {summary['masked_weights']:,} weights",
        f"backends     {backends or 'none'}",
        f"tasks        {len(tasks)}: {shown or 'none'}",
        f"files        {len(summary['files'])}, {summary['total_bytes']:,} bytes",
    ]
    for entry in summary["files"]:
        lines.append(f"  {entry['path']:<48} {entry['bytes']:>14,}  {entry['sha256'][:12]}")
    verification = summary.get("verification")
    if verification is not None:
        lines.append("")
        lines.append(f"verify       {verification['files_checked']} files, {verification['tasks_checked']} tasks: "
                     + ("all ok" if verification["ok"] else f"{len(verification['failures'])} FAILED"))
        for path, error in verification["failures"].items():
            lines.append(f"  FAILED {path}: {error}")
    return "\n".join(lines)
