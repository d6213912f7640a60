"""The key/value cache of one generation, fed back into the decoder graph at every step.

optimum's graphs take the cache as inputs `past_key_values.<layer>.<...>` and return the grown
cache as outputs `present.<layer>.<...>`. Seq2seq decoders also carry the cross-attention keys of
the encoder output (`...encoder.key`): those are computed by the first run only, and later runs
return empty placeholders for them, so they are kept from the first run.

`HostCache` keeps the cache in numpy arrays (CPU). `DeviceCache` keeps it where the session runs
(CUDA) with ONNX Runtime's I/O binding, so it never crosses the bus between steps; only the
logits come back to the host."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxserve.server.runtime.sessions import CUDA, Session

PAST = "past_key_values."
PRESENT = "present."
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}

#: How a step model runs a graph: `timed(work)` runs `work` and counts its time as inference.
Timed = Callable[[Callable[[], np.ndarray]], np.ndarray]


def past_name(present: str) -> str:
    return PAST + present.removeprefix(PRESENT)


def present_name(past: str) -> str:
    return PRESENT + past.removeprefix(PAST)


def is_cross_attention(name: str) -> bool:
    return ".encoder." in name


@dataclass(frozen=True)
class PastInput:
    """One cache input of a graph: [batch, heads, length, head_dim] of `dtype`."""

    name: str
    heads: int
    head_dim: int
    dtype: type[np.floating]


def past_inputs(session: Session) -> list[PastInput]:
    """The graph's cache inputs, in its input order."""
    found = []
    for graph_input in session.session.get_inputs():
        if graph_input.name.startswith(PAST):
            _, heads, _, head_dim = graph_input.shape
            if not (isinstance(heads, int) and isinstance(head_dim, int)):
                raise ValueError(f"{graph_input.name} has symbolic heads or head size: {graph_input.shape}")
            found.append(PastInput(graph_input.name, heads, head_dim, _DTYPES[graph_input.type]))
    return found


def empty_past(session: Session, batch: int) -> dict[str, np.ndarray]:
    """A cache of length 0 for every past input of the graph: what the first run is fed."""
    return {p.name: np.zeros((batch, p.heads, 0, p.head_dim), p.dtype) for p in past_inputs(session)}


class Cache(ABC):
    """The cache plus how a graph is run with it. `run` feeds the cache (and `inputs`), stores the
    returned cache and hands back the logits of each row's last position."""

    def __init__(self, past: dict[str, np.ndarray]) -> None:
        self.values: dict[str, Any] = {}
        self._filled = False
        self.hold(past)

    def hold(self, arrays: dict[str, np.ndarray]) -> None:
        """Adds per-row inputs that every run is fed and that follow `take`."""
        self.values.update({name: self._adopt(value) for name, value in arrays.items()})

    def _adopt(self, value: np.ndarray) -> Any:
        return value

    @abstractmethod
    def run(self, session: Session, inputs: dict[str, np.ndarray]) -> np.ndarray: ...

    @abstractmethod
    def take(self, rows: np.ndarray) -> None:
        """Keeps the given rows, in that order (beam reordering, finished rows dropped)."""

    def clear(self) -> None:
        self.values = {}

    def _store(self, outputs: dict[str, Any]) -> None:
        for name, value in outputs.items():
            if name.startswith(PRESENT) and not (self._filled and is_cross_attention(name)):
                self.values[past_name(name)] = value
        self._filled = True


class HostCache(Cache):
    def run(self, session: Session, inputs: dict[str, np.ndarray]) -> np.ndarray:
        outputs = session.run({**inputs, **self.values})
        self._store(outputs)
        return np.asarray(outputs["logits"][:, -1], dtype=np.float32)

    def take(self, rows: np.ndarray) -> None:
        self.values = {name: value[rows] for name, value in self.values.items()}


class DeviceCache(Cache):
    """The cache as OrtValues on the session's device. `device` is "cuda" in serving; "cpu" gives
    the same code path on a machine without a GPU (tests use it)."""

    def __init__(self, past: dict[str, np.ndarray], device: str, device_id: int = 0) -> None:
        self.device, self.device_id = device, device_id
        super().__init__(past)

    def _adopt(self, value: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self.device, self.device_id)

    def run(self, session: Session, inputs: dict[str, np.ndarray]) -> np.ndarray:
        binding = session.session.io_binding()
        for name in session.input_names:
            if name in self.values:
                binding.bind_ortvalue_input(name, self.values[name])
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(inputs[name]))
        for name in session.output_names:
            # Only the logits are read on the host; the cache stays on the device.
            device = "cpu" if name == "logits" else self.device
            binding.bind_output(name, device, 0 if device == "cpu" else self.device_id)
        session.session.run_with_iobinding(binding)
        outputs = dict(zip(session.output_names, binding.get_outputs(), strict=True))
        logits = outputs.pop("logits").numpy()
        self._store(outputs)
        return np.asarray(logits[:, -1], dtype=np.float32)

    def take(self, rows: np.ndarray) -> None:
        # ONNX Runtime has no gather over OrtValues outside a graph: the rows go through the host.
        # Greedy decoding only does this when a sequence finishes; beam search once per step.
        self.values = {name: self._adopt(value.numpy()[rows]) for name, value in self.values.items()}


def new_cache(session: Session, batch: int) -> Cache:
    """An empty cache for `batch` rows, on the device the session runs on."""
    past = empty_past(session, batch)
    if session.provider == CUDA:
        return DeviceCache(past, "cuda", session.device_id)
    return HostCache(past)
