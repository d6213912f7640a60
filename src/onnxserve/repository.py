"""The model-repository layout, shared by the exporter (which writes it) and the server (which
reads it): REPOSITORY/NAME/VERSION/manifest.json, beside tokenizer.json and the ONNX files.
The manifest's schema is the `Manifest` message in protos/onnxserve/v1/manifest.proto."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

from google.protobuf import json_format

from onnxserve.v1 import manifest_pb2

MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FORMAT_VERSION = 1

# Names become folder names: no separators, no dot-dot, nothing a shell or URL would mangle.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RepositoryError(ValueError):
    """A repository, model name or manifest that cannot be used."""


def validate_model_name(name: str) -> str:
    if not _MODEL_NAME.fullmatch(name) or ".." in name:
        raise RepositoryError(
            f"invalid model name {name!r}: use letters, digits, '.', '_' or '-' "
            "(at most 128, starting with a letter or digit)"
        )
    return name


def version_dirs(model_dir: Path) -> dict[int, Path]:
    """The complete versions of a model: numbered folders that hold a manifest. Folders being
    written (exports write to a hidden temporary folder, then rename) are never listed."""
    if not model_dir.is_dir():
        return {}
    return {
        int(child.name): child
        for child in model_dir.iterdir()
        if child.name.isdigit() and (child / MANIFEST_FILE).is_file()
    }


def model_dirs(repository: Path) -> dict[str, Path]:
    """Model folders of a repository, by name; hidden and invalid names are skipped."""
    if not repository.is_dir():
        raise RepositoryError(f"model repository {repository} is not a directory")
    return {
        child.name: child
        for child in sorted(repository.iterdir())
        if child.is_dir() and _MODEL_NAME.fullmatch(child.name) and ".." not in child.name
    }


def read_manifest(version_dir: Path) -> manifest_pb2.Manifest:
    path = version_dir / MANIFEST_FILE
    try:
        return json_format.Parse(path.read_text(encoding="utf-8"), manifest_pb2.Manifest())
    except (OSError, json_format.ParseError) as error:
        raise RepositoryError(f"unreadable manifest {path}: {error}") from error


def write_manifest(version_dir: Path, manifest: manifest_pb2.Manifest) -> None:
    text = json_format.MessageToJson(manifest, indent=2, preserving_proto_field_name=True)
    (version_dir / MANIFEST_FILE).write_text(text + "\n", encoding="utf-8")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_files(version_dir: Path, files: Iterable[manifest_pb2.ModelFile]) -> None:
    """Checks files against the SHA-256 the export recorded in the manifest, so that a file changed
    since (a bad copy, a tampered volume) is refused instead of served. Reads every byte (a second
    or two per GB): call it off the event loop."""
    for model_file in files:
        if not model_file.sha256:
            raise RepositoryError(f"{model_file.path}: the manifest records no SHA-256 to check it by; export it again")
        found = sha256(version_dir / model_file.path)
        if found != model_file.sha256.lower():
            raise RepositoryError(
                f"{model_file.path}: SHA-256 {found} does not match the manifest's {model_file.sha256}: "
                "the file changed after export (a bad copy, or a tampered volume)"
            )
