"""The fused decoder's KV buffers take memory as rows are written and give it back when rows fall
free (issue 17, item 4: int4 Gemma 3 270M under 1 GiB while serving), and what a row computes
does not change by a bit against buffers that hold all their rows from the start.

Which pages take memory is read with mincore(2) for the rows no run has bound and for released
ones: those are never mapped, whatever else the system does, so the counts are exact."""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Iterator

import numpy as np
import pytest
from onnxserve.export.decoder_graph import build_decoder_graph
from onnxserve.server.runtime.sessions import Session, SessionSettings
from onnxserve.server.tasks.generation import fused
from onnxserve.server.tasks.generation.fused import FusedBatch, FusedGraph, release_rows, zeroed_pages
from transformers import AutoModelForCausalLM

KINDS = ["llama-causal-lm", "gemma3-causal-lm"]
LENGTH = 32
ROWS = 16
PROMPTS = [[5, 17, 33, 2, 8], [9, 4, 71], [12, 3, 40, 41, 7, 6]]
STEPS = 4
_LIBC = ctypes.CDLL(None, use_errno=True)


def resident_rows(array: np.ndarray) -> list[int]:
    """Per row of a `zeroed_pages` array, how many of the pages it lies on hold memory (mincore)."""
    pages = -(-array.nbytes // mmap.PAGESIZE)
    found = (ctypes.c_ubyte * pages)()
    if _LIBC.mincore(ctypes.c_void_p(array.ctypes.data), ctypes.c_size_t(array.nbytes), found) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    row = array.strides[0]
    return [
        sum(found[page] & 1 for page in range(start // mmap.PAGESIZE, -(-(start + row) // mmap.PAGESIZE)))
        for start in range(0, array.nbytes, row)
    ]


@pytest.fixture(scope="module")
def graphs(checkpoint, tmp_path_factory) -> dict[str, FusedGraph]:
    built = {}
    for kind in KINDS:
        path = tmp_path_factory.mktemp(kind) / "model.onnx"
        build_decoder_graph(AutoModelForCausalLM.from_pretrained(checkpoint(kind)), path, max_length=2 * LENGTH)
        built[kind] = FusedGraph(Session(path, SessionSettings(intra_op_threads=1)))
    return built


@pytest.fixture(params=["probed", "forced"])
def graph(request, graphs) -> Iterator[FusedGraph]:
    """The tiny Llama, its spare row as probed on this machine and forced."""
    graph = graphs["llama-causal-lm"]
    probed = graph.pads_solo_runs
    graph.pads_solo_runs = probed or request.param == "forced"
    yield graph
    graph.pads_solo_runs = probed


def test_released_rows_read_as_zeros_and_hold_no_memory():
    array = zeroed_pages((4, 2, 64, 16), np.float32)  # 8 KB rows: two pages each
    array[:] = 1.5
    assert resident_rows(array) == [2, 2, 2, 2]
    release_rows(array, 2)
    assert resident_rows(array) == [2, 2, 0, 0]
    assert (array[:2] == 1.5).all() and (array[2:] == 0).all()


def test_a_page_shared_with_a_row_in_use_keeps_its_contents():
    array = zeroed_pages((4, 3, 16, 16), np.float32)  # 3 KB rows: row 1 starts inside page 0
    array[:] = 2.0
    release_rows(array, 1)
    assert resident_rows(array) == [1, 1, 0, 0]  # before reading: a read maps the zero page
    flat, page = array.reshape(-1), mmap.PAGESIZE // array.itemsize
    assert (flat[:page] == 2.0).all() and (flat[page:] == 0).all()


def test_only_the_rows_runs_bind_hold_memory_and_released_ones_give_it_back(graph):
    batch = FusedBatch(graph, rows=ROWS, length=LENGTH)
    bound = 1 + graph.pads_solo_runs  # the spare row runs beside a lone row
    batch.prefill(0, PROMPTS[:1])
    batch.decode(np.array([7]))
    for array in batch.buffers.host.values():
        taken = resident_rows(array)
        assert taken[0] > 0 and not any(taken[bound:]), taken
    batch.prefill(1, PROMPTS[1:])
    kept = {name: array[0].copy() for name, array in batch.buffers.host.items()}
    batch.release(1)
    for name, array in batch.buffers.host.items():
        assert not any(resident_rows(array)[1:])
        assert np.array_equal(array[0], kept[name])


def decoded_through_leaves_and_joins(graph: FusedGraph) -> np.ndarray:
    """Every run's logits, greedy, as the scheduler runs rows: two prompts decode; row 1's sequence
    leaves and its row is released; row 0 decodes alone; a newcomer is prefilled into row 1, the
    buffers grow to a longer length, and both decode on."""
    batch = FusedBatch(graph, rows=3, length=LENGTH)
    runs = [batch.prefill(0, PROMPTS[:1]), batch.prefill(1, PROMPTS[1:2])]
    latest = np.concatenate(runs)
    for _ in range(STEPS):
        latest = batch.decode(latest.argmax(axis=-1))
        runs.append(latest)
    batch.release(1)
    runs.append(batch.decode(latest[:1].argmax(axis=-1)))
    runs.append(batch.prefill(1, PROMPTS[2:]))
    batch.grow(2 * LENGTH, rows_used=2)
    latest = np.concatenate(runs[-2:])
    for _ in range(STEPS):
        latest = batch.decode(latest.argmax(axis=-1))
        runs.append(latest)
    return np.concatenate(runs)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spare_row", ["probed", "forced"])
def test_rows_compute_the_same_bits_as_in_preallocated_buffers(graphs, kind, spare_row, monkeypatch):
    graph = graphs[kind]
    probed = graph.pads_solo_runs
    graph.pads_solo_runs = probed or spare_row == "forced"
    try:
        mapped = decoded_through_leaves_and_joins(graph)
        # The buffers as they were: numpy's zeros, every row allocated up front, nothing released.
        monkeypatch.setattr(fused, "zeroed_pages", np.zeros)
        monkeypatch.setattr(fused, "release_rows", lambda array, first: None)
        preallocated = decoded_through_leaves_and_joins(graph)
    finally:
        graph.pads_solo_runs = probed
    assert np.array_equal(mapped.view(np.int32), preallocated.view(np.int32))


def test_decode_steps_past_the_first_length_after_growing_bind_the_grown_buffers(graphs, monkeypatch):
    """Steps of the same rows reuse their binding (FusedBatch._rows_binding) until the buffers
    grow: two rows decode to the buffers' end, grow, and decode past the first length; the logits
    equal, bit for bit, those of a binding made anew for every run."""
    graph = graphs["llama-causal-lm"]

    def decoded() -> np.ndarray:
        batch = FusedBatch(graph, rows=2, length=LENGTH)
        latest = batch.prefill(0, PROMPTS[:2])
        runs = [latest]
        while batch.lengths[:2].max() < 2 * LENGTH - 1:
            if batch.lengths[:2].max() == LENGTH:
                batch.grow(2 * LENGTH, rows_used=2)
            latest = batch.decode(latest.argmax(axis=-1))
            runs.append(latest)
        return np.concatenate(runs)

    reused = decoded()
    anew = FusedBatch._rows_binding

    def bound_anew(batch: FusedBatch, first: int, count: int):
        batch._binding = None
        return anew(batch, first, count)

    monkeypatch.setattr(FusedBatch, "_rows_binding", bound_anew)
    assert np.array_equal(reused.view(np.int32), decoded().view(np.int32))
