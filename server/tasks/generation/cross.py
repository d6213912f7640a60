"""Encoder-decoder rows in the shared batch (continuous batching, scheduler.py): the fused Whisper
decoder (docs/decoder-graph.md, "Whisper"; export/whisper_graph.py).

Besides the KV buffers of the causal graph, each row has its encoder's keys and values, per layer
[heads, head_dim, frames] and [heads, frames, head_dim], in buffers of their own. When a row
joins, the cross_attention graph projects its encoder states once, its outputs bound straight into
the row's place; every run of the decoder then reads the rows it covers by address, as it does
the KV buffers. A row that moves (rows in use stay contiguous) takes its encoder keys with it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from onnxserve.server.errors import ModelLoadError
from onnxserve.server.runtime.sessions import CUDA, Session
from onnxserve.server.tasks.generation.fused import FusedBatch, FusedGraph, release_rows, zeroed_pages

CROSS = "cross_key_values."
ENCODER_STATES = "encoder_hidden_states"


@dataclass(frozen=True)
class CrossInput:
    """One of the decoder's encoder key/value inputs: [batch, *shape] float32."""

    name: str
    shape: tuple[int, ...]


def cross_inputs(session: Session) -> list[CrossInput]:
    """The decoder's encoder key/value inputs, whose shapes past the batch must be fixed."""
    found = []
    for graph_input in session.session.get_inputs():
        if graph_input.name.startswith(CROSS):
            shape = tuple(graph_input.shape[1:])
            if not all(isinstance(size, int) for size in shape):
                raise ModelLoadError(f"{graph_input.name} has a symbolic shape: {graph_input.shape}")
            found.append(CrossInput(graph_input.name, shape))
    return found


class CrossGraph(FusedGraph):
    """The fused decoder of an encoder-decoder and the graph of its encoder keys and values.
    Served from host memory only (the buffers are numpy arrays)."""

    def __init__(self, decoder: Session, cross_attention: Session) -> None:
        if decoder.provider == CUDA:
            raise ModelLoadError("the fused encoder-decoder graph keeps its buffers on the host: serve it on the CPU")
        self.cross_attention = cross_attention
        self.cross = cross_inputs(decoder)
        super().__init__(decoder, cache_device=None)

    def batch(self, rows: int, length: int) -> CrossBatch:
        return CrossBatch(self, rows, length)


class CrossBatch(FusedBatch):
    """A FusedBatch whose rows also hold their encoder keys and values."""

    def __init__(self, graph: CrossGraph, rows: int, length: int) -> None:
        super().__init__(graph, rows, length)
        self.cross_attention = graph.cross_attention
        # Memory as the KV buffers' (fused.py): pages taken when a row is first written, handed back when it leaves.
        self.cross = {c.name: zeroed_pages((len(self.lengths), *c.shape), np.float32) for c in graph.cross}

    def prefill(
        self, first: int, prompts: Sequence[Sequence[int]], encoder_states: np.ndarray | None = None
    ) -> np.ndarray:
        """Runs the prompts into rows [first, first + len(prompts)), over `encoder_states` (one
        row per prompt; None: the rows' encoder keys as they are)."""
        if encoder_states is not None:
            self._project(first, encoder_states)
        return super().prefill(first, prompts)

    def _project(self, first: int, encoder_states: np.ndarray) -> None:
        """The encoder keys and values of rows [first, first + len(encoder_states))."""
        binding = self.cross_attention.session.io_binding()
        binding.bind_cpu_input(ENCODER_STATES, np.ascontiguousarray(encoder_states, dtype=np.float32))
        self._bind_cross(binding, first, len(encoder_states), binding.bind_output)
        self.cross_attention.session.run_with_iobinding(binding)

    def bind(self, binding: ort.IOBinding, first: int, count: int) -> None:
        super().bind(binding, first, count)
        self._bind_cross(binding, first, count, binding.bind_input)

    def _bind_cross(self, binding: ort.IOBinding, first: int, count: int, bind: Callable[..., None]) -> None:
        for name, array in self.cross.items():
            rows = array[first : first + count]
            bind(name, "cpu", 0, np.float32, list(rows.shape), rows.ctypes.data)

    def copy_rows(self, source: np.ndarray, target: np.ndarray) -> None:
        super().copy_rows(source, target)
        for array in self.cross.values():
            array[target] = array[source]

    def release(self, first: int) -> None:
        super().release(first)
        for array in self.cross.values():
            release_rows(array, first)
