"""The models the server holds, by name and version, and the calls in flight on each."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Collection

from onnxserve.server.errors import InvalidArgument, NotFound, Unavailable
from onnxserve.server.models.loaded import LoadedModel

from onnxserve.repository import RepositoryError, validate_model_name
from onnxserve.v1 import models_pb2

log = logging.getLogger(__name__)
READY = models_pb2.MODEL_STATE_READY


class ModelRegistry:
    """Changed only on the event loop (or before serving starts). Every change swaps in a new
    mapping instead of editing one: a new version takes the traffic in one step, and readers on
    other threads (a metrics scrape) always see a consistent snapshot."""

    def __init__(self, required_models: Collection[str] = ()) -> None:
        self.required_models = tuple(required_models)
        self._models: dict[str, dict[int, LoadedModel]] = {}
        # Calls in flight by id() of the model; a model is referenced (so its id is its own) until
        # its count is back to zero.
        self._in_flight: Counter[int] = Counter()

    def put(self, model: LoadedModel) -> list[LoadedModel]:
        """Adds a loaded version. A READY one takes all of its model's traffic at once; the versions
        it replaces are returned, to be unloaded once drained. A FAILED one is kept for its reason
        beside the version still serving, but never replaces a READY one of the same number."""
        versions = self._models.get(model.name, {})
        if model.state == READY:
            replaced = [m for m in versions.values() if m is not model]
            self._models = {**self._models, model.name: {model.version: model}}
            return replaced
        current = versions.get(model.version)
        if current is not None and current.state == READY:
            log.error("model %s version %d stays on its loaded copy: %s", model.name, model.version, model.reason)
            return []
        self._models = {**self._models, model.name: {**versions, model.version: model}}
        return [current] if current is not None else []

    def remove(self, name: str) -> list[LoadedModel]:
        """Stops routing to a model; returns its versions, to be unloaded once drained."""
        models = {**self._models}
        removed = models.pop(name, {})
        self._models = models
        return list(removed.values())

    def names(self) -> set[str]:
        return set(self._models)

    def holds(self, name: str) -> bool:
        return name in self._models

    def ready(self) -> bool:
        """Readiness: every required model (by default, every model held) has a READY version
        serving; a required model the repository lacks, or whose only version failed, is not."""
        models = self._models
        names = self.required_models or models
        return all(any(m.state == READY for m in models.get(name, {}).values()) for name in names)

    def models(self) -> list[LoadedModel]:
        models = self._models
        return [models[name][v] for name in sorted(models) for v in sorted(models[name])]

    def get(self, name: str, version: int = 0) -> LoadedModel:
        """The model version in any state; version 0 is the latest ready one. Names that could not
        be a model folder are INVALID_ARGUMENT; unknown ones NOT_FOUND."""
        try:
            validate_model_name(name)
        except RepositoryError as error:
            raise InvalidArgument(str(error)) from None
        versions = self._models.get(name)
        if not versions:
            known = ", ".join(sorted(self._models)) or "none"
            raise NotFound(f"model {name!r} is not served; the models are: {known}")
        if version == 0:
            ready = [v for v, m in versions.items() if m.state == READY]
            return versions[max(ready or versions)]
        if version not in versions:
            raise NotFound(f"model {name!r} has no version {version}; loaded versions: {sorted(versions)}")
        return versions[version]

    def resolve(self, name: str, version: int = 0) -> LoadedModel:
        """The model version to run a request on; it must be READY. The call is counted in flight
        on it until the task that resolved it ends (a gRPC call's task ends once it is answered),
        so that a replaced version is unloaded only after the calls it took have finished; tying
        the count to the task means no handler can forget to give it back."""
        model = self.get(name, version)
        if model.state != READY:
            state = models_pb2.ModelState.Name(model.state)
            raise Unavailable(f"model {name!r} version {model.version} is {state}: {model.reason}")
        self._hold(model)
        return model

    def _hold(self, model: LoadedModel) -> None:
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no event loop: a blocking caller, outside any gRPC call
            return
        if task is not None:
            key = id(model)
            self._in_flight[key] += 1
            task.add_done_callback(lambda _: self._release(key))

    def _release(self, key: int) -> None:
        self._in_flight[key] -= 1
        if not self._in_flight[key]:
            del self._in_flight[key]

    def in_flight(self, model: LoadedModel) -> int:
        return self._in_flight[id(model)]
