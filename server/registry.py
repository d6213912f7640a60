"""The models the server holds, by name and version."""

from __future__ import annotations

import logging
from concurrent.futures import Executor

from onnxserve.server.config import ServerSettings
from onnxserve.server.errors import NotFound, Unavailable
from onnxserve.server.models import LoadedModel, load_model

from onnxserve.repository import model_dirs, version_dirs
from onnxserve.v1 import models_pb2

log = logging.getLogger(__name__)


class ModelRegistry:
    def __init__(self, settings: ServerSettings, device: str, executor: Executor) -> None:
        self.settings = settings
        self.device = device
        self.executor = executor
        self._models: dict[str, dict[int, LoadedModel]] = {}

    def load_repository(self) -> None:
        """Loads the latest complete version of every model in the repository."""
        for name, directory in model_dirs(self.settings.repository).items():
            versions = version_dirs(directory)
            if not versions:
                log.warning("model folder %s holds no complete version; skipped", directory)
                continue
            latest = max(versions)
            self.add(load_model(name, latest, versions[latest], self.device, self.settings.models, self.executor))

    def add(self, model: LoadedModel) -> None:
        self._models.setdefault(model.name, {})[model.version] = model

    def models(self) -> list[LoadedModel]:
        return [self._models[name][v] for name in sorted(self._models) for v in sorted(self._models[name])]

    def get(self, name: str, version: int = 0) -> LoadedModel:
        """The model version in any state; version 0 is the latest. Unknown ones are NOT_FOUND."""
        versions = self._models.get(name)
        if not versions:
            known = ", ".join(sorted(self._models)) or "none"
            raise NotFound(f"model {name!r} is not served; the models are: {known}")
        if version == 0:
            ready = [v for v, m in versions.items() if m.state == models_pb2.MODEL_STATE_READY]
            return versions[max(ready or versions)]
        if version not in versions:
            raise NotFound(
                f"model {name!r} has no version {version}; loaded versions: {sorted(versions)}"
            )
        return versions[version]

    def resolve(self, name: str, version: int = 0) -> LoadedModel:
        """The model version to run a request on; it must be READY."""
        model = self.get(name, version)
        if model.state != models_pb2.MODEL_STATE_READY:
            state = models_pb2.ModelState.Name(model.state)
            raise Unavailable(f"model {name!r} version {model.version} is {state}: {model.reason}")
        return model
