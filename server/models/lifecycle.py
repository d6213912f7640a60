"""Model lifecycle: keeps the registry in step with the repository.

Each model folder is served at its latest complete version. A version is loaded and warmed up
before it is put in the registry, so it takes traffic (and its health turns SERVING) only once it
has answered; the versions it replaces are unloaded after their calls in flight have finished. A
model folder that disappears is unloaded the same way. A version that fails to load is kept
FAILED, with its reason, and the rest of the server goes on. The repository is polled, rather than
watched with inotify, so that it works the same on network and container volumes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from onnxserve.server.config.settings import ServerSettings
from onnxserve.server.models.loaded import LoadedModel
from onnxserve.server.models.loading import load_model
from onnxserve.server.models.registry import ModelRegistry
from onnxserve.server.runtime.sessions import resolve_device
from onnxserve.server.tasks.base import Executors

from onnxserve.repository import RepositoryError, model_dirs, version_dirs
from onnxserve.v1 import models_pb2

log = logging.getLogger(__name__)

Fingerprint = tuple[int, tuple[tuple[str, int, int], ...]]
DRAIN_CHECK_S = 0.05


def fingerprint(version: int, directory: Path) -> Fingerprint:
    """What identifies a version's contents: its number and its files' names, sizes and mtimes, so
    that a version whose files are replaced in place is loaded again."""
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir() if p.is_file())
    return version, tuple(files)


def scan(repository: Path) -> dict[str, tuple[Path, Fingerprint]]:
    """The latest complete version of each model folder, with its fingerprint."""
    latest = {}
    for name, model_dir in model_dirs(repository).items():
        versions = version_dirs(model_dir)
        if versions:
            version = max(versions)
            latest[name] = (versions[version], fingerprint(version, versions[version]))
    return latest


class ModelLifecycle:
    def __init__(
        self,
        settings: ServerSettings,
        registry: ModelRegistry,
        executors: Executors,
        on_change: Callable[[], Awaitable[None]],
        on_ready: Callable[[LoadedModel], None] = lambda model: None,
    ) -> None:
        self.settings = settings
        # Resolved once, so that a device that cannot be used fails the server at start.
        self.default_device = resolve_device(settings.models.device or settings.device)
        self.devices = {
            name: resolve_device(model.device or settings.device) for name, model in settings.model_overrides.items()
        }
        self.registry = registry
        self.executors = executors
        self.on_change = on_change  # after each change in what is served: the server republishes health
        self.on_ready = on_ready  # before a version takes traffic: the server attaches its metrics
        self._seen: dict[str, Fingerprint] = {}
        self._unloading: set[asyncio.Task] = set()
        self._polling: asyncio.Task | None = None

    async def _blocking(self, work: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executors.tokenizing, work, *args)

    async def sync(self) -> None:
        """One pass: loads what is new or changed, unloads what is gone."""
        try:
            wanted = await self._blocking(scan, self.settings.repository)
        except (RepositoryError, OSError) as error:
            # A repository that cannot be read (a remount, a network volume's hiccup) unloads nothing.
            log.warning("cannot read the model repository: %s; serving on unchanged", error)
            return
        for name in sorted(self.registry.names() - wanted.keys()):
            log.info("model %s left the repository; unloading it", name)
            self._seen.pop(name, None)
            self._unload(self.registry.remove(name))
            await self.on_change()
        for name, (directory, seen) in wanted.items():
            if self._seen.get(name) != seen:
                self._seen[name] = seen
                await self._load(name, seen[0], directory)

    async def _load(self, name: str, version: int, directory: Path) -> None:
        model_settings = self.settings.model_settings(name)
        device = self.devices.get(name, self.default_device)
        model = await self._blocking(load_model, name, version, directory, device, model_settings, self.executors)
        model.max_response_bytes = self.settings.max_send_message_bytes
        if model.state == models_pb2.MODEL_STATE_READY and model_settings.warmup:
            await self._warm_up(model)
        if model.state == models_pb2.MODEL_STATE_READY:
            self.on_ready(model)
        replaced = self.registry.put(model)
        newer = sorted(m.version for m in replaced if m.version > model.version)
        if newer and model.state == models_pb2.MODEL_STATE_READY:  # the latest version folder was deleted
            log.info("model %s rolled back to version %d (version %s left the repository)", name, version,
                     ", ".join(map(str, newer)))  # fmt: skip
        self._unload(replaced)
        await self.on_change()

    async def _warm_up(self, model: LoadedModel) -> None:
        try:
            await model.warm_up()
        except Exception as error:  # whatever breaks the first run would break every call
            model.state, model.reason = models_pb2.MODEL_STATE_FAILED, f"warm-up failed: {error}"
            log.error("model %s version %d failed its warm-up: %s", model.name, model.version, error)
            await model.close()

    def _unload(self, models: list[LoadedModel]) -> None:
        for model in models:
            model.state = models_pb2.MODEL_STATE_UNLOADING
            task = asyncio.get_running_loop().create_task(self._drain_and_close(model))
            self._unloading.add(task)
            task.add_done_callback(self._unloading.discard)

    async def _drain_and_close(self, model: LoadedModel) -> None:
        while self.registry.in_flight(model):
            await asyncio.sleep(DRAIN_CHECK_S)
        await model.close()
        log.info("model %s version %d unloaded", model.name, model.version)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                await self.sync()
            except Exception:  # the watcher must outlive any one bad pass
                log.exception("repository poll failed")

    def start_polling(self) -> None:
        if self.settings.poll_interval_s > 0:
            self._polling = asyncio.get_running_loop().create_task(self._poll(), name="repository poll")

    async def stop(self) -> None:
        """Stops polling and closes every model still held (their calls have ended by now)."""
        if self._polling is not None:
            self._polling.cancel()
            await asyncio.gather(self._polling, return_exceptions=True)
        for name in self.registry.names():
            self._unload(self.registry.remove(name))
        await asyncio.gather(*self._unloading, return_exceptions=True)

