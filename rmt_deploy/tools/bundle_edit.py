"""Adding tasks to a bundle and removing them, without a re-export (numpy only).

    add_tasks("bundle/", ["dtd.rmtask"])      # fingerprint, activation and masks checked first
    remove_tasks("bundle/", ["eurosat"])

The manifest is the commit point: a new task file is copied in under a hidden temporary
name, checked from that copy, renamed into place, and only then listed in the manifest
(written atomically); removed tasks leave the manifest first and their files after.
A crash leaves the old or the new bundle, never a half-edited one, and the next writer
removes what it left. One writer at a time: every writer of a bundle (these, `export
--force`, the Triton repository export) takes its lock (artifacts.writer_lock) before it
reads the manifest; a second one waits up to `wait` seconds, then fails naming the holder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from rmt_deploy.artifacts.bundle import FOLDED_DIR, MANIFEST, TASKS_DIR, Bundle
from rmt_deploy.artifacts.integrity import REBUILD, FileRecord, read_verified
from rmt_deploy.artifacts.staging import remove_stale, usual_mode
from rmt_deploy.artifacts.task_file import MAX_TASK_FILE_BYTES, SUFFIX
from rmt_deploy.artifacts.writer_lock import writer_lock
from rmt_deploy.errors import ArtifactError, InputError, RmtError, UnknownTaskError
from rmt_deploy.runtime.task_reader import decode_zeros, read_compact

__all__ = ["add_tasks", "remove_tasks"]

LEGACY_LOCK_FILE = ".lock"  # the editors' lock file before issue #24


@contextmanager
def _edit_lock(root: Path, wait: float | None = None) -> Iterator[None]:
    """The bundle's writer lock; then what a killed writer left is cleaned (every writer does it)."""
    with writer_lock(root, wait):
        remove_stale(Path(root).resolve())  # stages of a killed `export --force` beside the bundle
        yield


def _clean_leftovers(bundle: Bundle) -> None:
    """Remove what a killed editor left inside the bundle (call under the lock): hidden temporary files
    and task or folded files the manifest does not list."""
    listed = set(bundle.manifest.checksums)
    doomed = [p for p in bundle.root.glob(f".{MANIFEST}.*.tmp")] + [bundle.root / LEGACY_LOCK_FILE]
    for folder in (TASKS_DIR, FOLDED_DIR):
        if (bundle.root / folder).is_dir():
            doomed += [p for p in (bundle.root / folder).iterdir()
                       if f"{folder}/{p.name}" not in listed and not p.is_dir()]
    for path in doomed:
        path.unlink(missing_ok=True)


def _editable(root: str | os.PathLike) -> Bundle:
    bundle = Bundle.open(root)
    if not bundle.verified:
        raise ArtifactError(f"{bundle.root}: this format-1 bundle records no file hashes and cannot be "
                            f"edited; {REBUILD}")
    return bundle


def _stage_copy(bundle: Bundle, source: Path) -> tuple[Path, str, FileRecord]:
    """Copy a task file into the bundle under a hidden name and check the copy; (temp path, name, record)."""
    data = read_verified(source, None, MAX_TASK_FILE_BYTES)
    record = FileRecord(len(data), hashlib.sha256(data).hexdigest())
    fd, tmp = tempfile.mkstemp(prefix=".add-", suffix=SUFFIX, dir=bundle.root / TASKS_DIR)
    staged = Path(tmp)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(staged, usual_mode())
        manifest = bundle.manifest
        shapes = {t.name: tuple(t.shape) for t in manifest.masked_tensors}
        task = read_compact(staged, manifest.fingerprint, shapes, manifest.embed_dim, record,
                            quick_gelu=manifest.quick_gelu)  # the copy must hold the bytes read
        decode_zeros(task.blobs, shapes)  # every mask decodes: a damaged blob fails here, not in serving
    except BaseException as exc:
        staged.unlink(missing_ok=True)
        if isinstance(exc, RmtError) and str(staged) in str(exc):  # name the user's file, not our copy
            raise type(exc)(str(exc).replace(str(staged), str(source))) from None
        raise
    return staged, task.head.name, record


def add_tasks(root: str | os.PathLike, sources: Sequence[str | os.PathLike], wait: float | None = None) -> list[str]:
    """Copy .rmtask files into a bundle and list them in its manifest; returns the names added."""
    with _edit_lock(Path(root), wait):
        bundle = _editable(root)  # read once the lock is held: as no other writer leaves it
        _clean_leftovers(bundle)
        (bundle.root / TASKS_DIR).mkdir(exist_ok=True)
        staged: list[tuple[Path, str, FileRecord]] = []
        placed: list[Path] = []
        try:
            for source in sources:
                staged.append(_stage_copy(bundle, Path(source)))
                _check_new_name(bundle, staged[-1][1], [s[1] for s in staged[:-1]], Path(source))
            checksums = dict(bundle.manifest.checksums)
            for tmp, name, record in staged:
                relative = bundle.task_relative(name)
                os.replace(tmp, bundle.root / relative)
                placed.append(bundle.root / relative)
                checksums[relative] = record
            names = [name for _, name, _ in staged]
            manifest = dataclasses.replace(bundle.manifest, tasks=bundle.manifest.tasks + names,
                                           checksums=checksums)
            Bundle(bundle.root, manifest).write_manifest()
        except BaseException:
            for tmp, _, _ in staged:
                tmp.unlink(missing_ok=True)
            for path in placed:  # not listed by the manifest: take them back out
                path.unlink(missing_ok=True)
            raise
    return names


def _check_new_name(bundle: Bundle, name: str, earlier: list[str], source: Path) -> None:
    if name in bundle.manifest.tasks:
        raise InputError(f"{source}: the bundle already has a task {name!r}; remove it first with "
                         f"`rmt-deploy bundle remove {bundle.root} {name}`")
    if name in earlier:
        raise InputError(f"{source}: task {name!r} is given twice; add each task once")


def remove_tasks(root: str | os.PathLike, names: Sequence[str], wait: float | None = None) -> list[str]:
    """Unlist tasks from a bundle's manifest, then delete their files (task packs and folded models)."""
    with _edit_lock(Path(root), wait):
        bundle = _editable(root)
        _clean_leftovers(bundle)
        manifest = bundle.manifest
        for name in names:
            if name not in manifest.tasks:
                raise UnknownTaskError(f"task {name!r} not in bundle {bundle.root} "
                                       f"(available: {', '.join(manifest.tasks) or 'none'})")
        gone = set(names)
        files = {backend: _without_folded(entry, gone) for backend, entry in manifest.files.items()}
        doomed = [bundle.task_relative(n) for n in gone]
        doomed += [path for entry in manifest.files.values() for task, path in entry.get("folded", {}).items()
                   if task in gone]
        checksums = {rel: rec for rel, rec in manifest.checksums.items() if rel not in doomed}
        kept = [t for t in manifest.tasks if t not in gone]
        Bundle(bundle.root, dataclasses.replace(manifest, tasks=kept, files=files, checksums=checksums)
               ).write_manifest()
        for relative in doomed:
            (bundle.root / relative).unlink(missing_ok=True)
    return list(names)


def _without_folded(entry: dict, gone: set[str]) -> dict:
    if "folded" not in entry:
        return entry
    return {**entry, "folded": {task: path for task, path in entry["folded"].items() if task not in gone}}
