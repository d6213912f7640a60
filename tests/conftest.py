"""Shared fixtures: tiny checkpoints built from configs, exported once per session into a cache,
and real servers on free loopback ports serving just the models a test module asks for."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from onnxserve.client import Client
from onnxserve.server.app import OnnxServer
from onnxserve.server.config.settings import ModelSettings, ServerSettings


@dataclass(frozen=True)
class Exported:
    """A checkpoint and its exported model folder (REPOSITORY/NAME)."""

    name: str
    checkpoint: Path
    model_dir: Path


class RunningServer:
    """An OnnxServer on its own event loop in a background thread, bound to a free port."""

    def __init__(self, settings: ServerSettings) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = OnnxServer(settings)
        self.port = self.call(self.server.start())
        self.target = f"127.0.0.1:{self.port}"

    def call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=300)

    def client(self, timeout: float | None = 60) -> Client:
        return Client(self.target, timeout=timeout)

    def stop(self) -> None:
        if not self.thread.is_alive():  # stopped already, by the test itself
            return
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Builds a tiny checkpoint of a kind from tests/checkpoints.py, once per session."""
    from tests.checkpoints import build_checkpoint

    built: dict[str, Path] = {}

    def build(kind: str) -> Path:
        if kind not in built:
            built[kind] = build_checkpoint(kind, tmp_path_factory.mktemp(kind))
        return built[kind]

    return build


@pytest.fixture(scope="session")
def export(tmp_path_factory: pytest.TempPathFactory, checkpoint: Callable[[str], Path]) -> Callable[..., Exported]:
    """Exports a checkpoint kind (or a source folder) once per session and precision set."""
    from onnxserve.export.exporter import export_model

    repository = tmp_path_factory.mktemp("export-cache")
    done: dict[tuple, Exported] = {}

    def run(
        kind: str, precisions: Sequence[str] = ("fp32", "int8"), source: Path | None = None, task: str | None = None
    ) -> Exported:
        key = (kind, tuple(precisions))
        if key not in done:
            source = source or checkpoint(kind)
            name = f"{kind}-{'-'.join(precisions)}"
            version_dir = export_model(
                str(source), repository, name=name, task=task, precisions=precisions, show_progress=False
            )
            done[key] = Exported(name, source, version_dir.parent)
        return done[key]

    return run


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RunningServer]]:
    """Starts a server over a fresh repository that links the given exported models. `settings`
    holds further ServerSettings fields (a repository given there is used as it is)."""
    running: list[RunningServer] = []

    def start(
        models: dict[str, Exported], settings: dict[str, object] | None = None, **model_settings: object
    ) -> RunningServer:
        repository = tmp_path_factory.mktemp("repository")
        for name, exported in models.items():
            (repository / name).symlink_to(exported.model_dir, target_is_directory=True)
        options = {"repository": repository, "port": 0, "device": "cpu", **(settings or {})}
        server = RunningServer(ServerSettings(**options, models=ModelSettings(**model_settings)))
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()


# The usual parity setup of a test module that lists its checkpoint kinds in KINDS: every kind
# exported once, served in fp32 and in int8. A module defines its own fixture to differ.
@pytest.fixture(scope="module")
def exported(request: pytest.FixtureRequest, export: Callable[..., Exported]) -> dict[str, Exported]:
    return {kind: export(kind) for kind in request.module.KINDS}


@pytest.fixture(scope="module")
def fp32_server(exported: dict[str, Exported], start_server: Callable[..., RunningServer]) -> RunningServer:
    # One thread per session: the tests compare numbers, and one thread wastes nothing on a busy machine.
    return start_server(exported, precision="fp32", intra_op_threads=1)


@pytest.fixture(scope="module")
def int8_server(exported: dict[str, Exported], start_server: Callable[..., RunningServer]) -> RunningServer:
    return start_server(exported, precision="int8", intra_op_threads=1)


@pytest.fixture
def client(fp32_server: RunningServer) -> Iterator[Client]:
    with fp32_server.client() as client:
        yield client
