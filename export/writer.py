"""Versioned, atomic writes into the model repository.

A version is assembled in a hidden folder inside REPOSITORY/NAME (same filesystem, so the final
rename is atomic) and renamed to the next free version number only when complete: readers never
see a half-written version, and a failed export leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from onnxserve.repository import sha256 as sha256  # the exporter's, shared with the server's check
from onnxserve.repository import write_manifest
from onnxserve.v1 import manifest_pb2

STAGING_PREFIX = ".tmp-"
_MAX_ATTEMPTS = 100  # concurrent exports of one name, each taking a number


@contextmanager
def staging(model_dir: Path) -> Iterator[Path]:
    """A fresh hidden folder in `model_dir`; removed on the way out unless published (renamed),
    with `model_dir` itself when this export created it and left nothing in it."""
    created = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    folder = model_dir / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if created:
            with suppress(OSError):  # not empty: a version was published, ours or a concurrent one
                model_dir.rmdir()


def publish(folder: Path, manifest: manifest_pb2.Manifest) -> Path:
    """Writes the manifest with the next version number and renames `folder` to that number;
    if a concurrent export took the number first, tries the one after."""
    model_dir = folder.parent
    for _ in range(_MAX_ATTEMPTS):
        manifest.version = _next_version(model_dir)
        write_manifest(folder, manifest)
        target = model_dir / str(manifest.version)
        try:
            target.mkdir()  # claims the number: fails when a concurrent export holds it
        except FileExistsError:
            continue
        try:
            os.rename(folder, target)  # atomically replaces the empty claimed folder (POSIX)
        except OSError:
            target.rmdir()
            raise
        return target
    raise OSError(f"could not claim a version number in {model_dir} after {_MAX_ATTEMPTS} attempts")


def _next_version(model_dir: Path) -> int:
    # Every numbered entry counts, complete or not, so a number is never reused.
    return 1 + max((int(child.name) for child in model_dir.iterdir() if child.name.isdigit()), default=0)
