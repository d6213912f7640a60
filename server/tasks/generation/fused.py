"""The fused decoder graph (docs/decoder-graph.md) on preallocated key/value buffers.

Each layer's cache is one buffer of [rows, kv_heads, length, head_dim], bound with ONNX Runtime's
I/O binding as both the `past_key_values.*` input and the `present.*` output of a run, so that
GroupQueryAttention writes each new position in place: a step copies nothing and concatenates
nothing, whatever the sequence length. A run covers a contiguous range of rows (bound by address),
so a prefill can fill some rows while others hold sequences being decoded. The logits go into a
preallocated buffer too. `length` is what the sequences need (longest prompt + new tokens), not
the model's context.

On the CPU the buffers are anonymous memory mappings (`zeroed_pages`): the system gives a page
memory when it is first written, so a buffer of 16 rows serving one stream takes one row's
memory, and a row's memory grows with its tokens. Rows that fall free are handed back
(`FusedBatch.release`), and the whole goes back to the system with the batch.

A run of one row and one token is given a spare row where this machine's kernels would compute a
row alone otherwise than beside batchmates (probed once per session, `solo_runs_differ`), so that
a stream's tokens never depend on who else is decoding (docs/batching.md)."""

from __future__ import annotations

import logging
import mmap
import weakref
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort
from onnxserve.server.errors import ModelLoadError
from onnxserve.server.runtime.sessions import CUDA, Session
from onnxserve.server.tasks.generation.cache import PastInput, Timed, past_inputs, present_name

log = logging.getLogger(__name__)

SEQLENS = "seqlens_k"
# The probe's rows: prompts, then one step's tokens (ids every vocabulary has).
PROBE_PROMPTS = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
PROBE_STEP = [10, 11, 12]

# Each session's probe result: FusedGraph is built per request, the probe runs once.
_SOLO_RUNS_DIFFER: weakref.WeakKeyDictionary[Session, bool] = weakref.WeakKeyDictionary()


def is_fused(session: Session) -> bool:
    """Whether the session runs the fused graph rather than optimum's layout."""
    return SEQLENS in session.input_names


class FusedGraph:
    """A fused decoder session and what its buffers are made of. The cache lives in numpy arrays
    on the CPU; under CUDA, in OrtValues on the device (`cache_device`, "cpu" gives that same
    code path on a machine without a GPU)."""

    def __init__(self, session: Session, cache_device: str | None = None) -> None:
        self.session = session
        self.past = past_inputs(session)
        _require_fp16_attention_on_cuda(session, self.past)
        self.vocab = _vocab(session)
        self.cache_device = cache_device or ("cuda" if session.provider == CUDA else None)
        self.device_id = session.device_id
        self.pads_solo_runs = False  # the probe runs its rows as they come
        # The probe is of ONNX Runtime's CPU kernels (MLAS); a device cache runs CUDA's.
        self.pads_solo_runs = self.cache_device is None and solo_runs_differ(self)

    def batch(self, rows: int, length: int) -> FusedBatch:
        """Buffers for `rows` rows of `length` positions on this graph."""
        return FusedBatch(self, rows, length)


def solo_runs_differ(graph: FusedGraph) -> bool:
    """Whether a row run alone (one token: M=1 in every MatMul) gets other logits, bit for bit, than
    the same row beside a batchmate, on this machine's kernels. ONNX Runtime 1.31's MatMulNBits
    runs M=1 on a path of its own on some CPUs and accuracy levels (AVX2 int4 at accuracy_level 4;
    fp32 compute, level 0, everywhere) and one path for every M >= 2, so padding such runs to two
    rows makes a row's result independent of its batchmates. Probed on the model's own graph, as
    which paths differ depends on its weights' configurations and the CPU; checked once per
    session. That two and three rows agree, which the padding relies on, is checked too."""
    if graph.session in _SOLO_RUNS_DIFFER:
        return _SOLO_RUNS_DIFFER[graph.session]
    batch = graph.batch(rows=len(PROBE_STEP), length=len(PROBE_PROMPTS[0]) + 1)
    batch.prefill(0, (np.array(PROBE_PROMPTS) % graph.vocab).tolist())
    prompted = batch.lengths.copy()
    first_row = []
    for rows in (1, 2, 3):
        batch.lengths[:] = prompted  # each run decodes the same step
        first_row.append(batch.decode(np.array(PROBE_STEP[:rows]) % graph.vocab)[0])
    differ = not np.array_equal(first_row[0], first_row[1])
    if differ:
        log.info("this machine's kernels compute a decoder row alone otherwise than in a batch: "
                 "runs of one row get a spare row, so that streams do not depend on their batchmates")  # fmt: skip
    if not np.array_equal(first_row[1], first_row[2]):
        log.warning("this machine's kernels compute a decoder row in a batch of 2 otherwise than in a batch "
                    "of 3: a stream's tokens may depend on how many others decode with it")  # fmt: skip
    _SOLO_RUNS_DIFFER[graph.session] = differ
    return differ


def _require_fp16_attention_on_cuda(session: Session, past: list[PastInput]) -> None:
    """Refuses a fused graph whose attention is not fp16 on the CUDA provider: onnxruntime 1.31's
    GroupQueryAttention has CUDA kernels for fp16 and bf16 only, so an fp32, int8 or int4 variant
    (weight-only: fp32 activations and cache) would run every attention node on the CPU, copying
    each layer's cache across the bus at every step, while reporting CUDA. Its type is the cache's."""
    dtypes = {p.dtype for p in past}
    if session.provider == CUDA and dtypes != {np.float16}:
        kinds = ", ".join(sorted(np.dtype(d).name for d in dtypes))
        raise ModelLoadError(
            f"this fused decoder's attention runs in {kinds}, and GroupQueryAttention has no {kinds} CUDA kernel "
            "in this onnxruntime (fp16 and bf16 only): it would run on the CPU at every step. On a GPU serve "
            "its fp16 variant (--precision fp16 or auto; export it with --precision fp16), or serve this one "
            "with --device cpu"
        )


def _vocab(session: Session) -> int:
    (logits,) = (o for o in session.session.get_outputs() if o.name == "logits")
    if not isinstance(logits.shape[-1], int):
        raise ModelLoadError(f"the fused decoder's logits have no fixed vocabulary size: {logits.shape}")
    return logits.shape[-1]


def zeroed_pages(shape: tuple[int, ...], dtype: type[np.generic]) -> np.ndarray:
    """A zeroed array on an anonymous memory mapping of its own. Its pages take memory only once
    written, and unmapping returns them when the array goes. numpy's zeros take a malloc block
    instead, which calloc must write zeros over when the block is reused, so a buffer's unused rows
    then cost as much as used ones (Gemma 3 270M: 36 KiB per row and position, 301 MiB for 17 rows
    of 504)."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    # Private: a shared anonymous mapping is shared memory, which MADV_DONTNEED does not free.
    pages = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE)
    # Linux: where transparent huge pages are "always", a row's first write would take 2 MB.
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        pages.madvise(mmap.MADV_NOHUGEPAGE)
    return np.ndarray(shape, dtype, buffer=pages)


def release_rows(array: np.ndarray, first: int) -> None:
    """Hands the whole pages of rows [first, ...) of a `zeroed_pages` array back to the system; they
    read as zeros after (a page shared with row first - 1 keeps its contents)."""
    pages = array.base
    start = -(-first * array.strides[0] // mmap.PAGESIZE) * mmap.PAGESIZE
    if start < len(pages):
        pages.madvise(mmap.MADV_DONTNEED, start, len(pages) - start)


class KVBuffers:
    """Every cache input's buffer, [rows, heads, length, head_dim] each."""

    def __init__(self, graph: FusedGraph, rows: int, length: int) -> None:
        self.graph, self.rows, self.length = graph, rows, length
        self.host: dict[str, np.ndarray] = {}
        self.device: dict[str, ort.OrtValue] = {}
        for past in graph.past:
            shape = (rows, past.heads, length, past.head_dim)
            if graph.cache_device is None:
                self.host[past.name] = zeroed_pages(shape, past.dtype)
            else:
                # Zeroed as on the host (calloc's zero pages cost no host memory): positions past
                # a row's length are never read, but uninitialized memory could hold NaNs.
                self.device[past.name] = ort.OrtValue.ortvalue_from_numpy(
                    np.zeros(shape, past.dtype), graph.cache_device, graph.device_id
                )

    def bind(self, binding: ort.IOBinding, first: int, count: int) -> None:
        """Binds rows [first, first + count) as both past and present of every layer."""
        device, device_id = self.graph.cache_device or "cpu", self.graph.device_id
        for past in self.graph.past:
            shape = [count, past.heads, self.length, past.head_dim]
            address = self._address(past) + first * int(np.prod(shape[1:])) * np.dtype(past.dtype).itemsize
            binding.bind_input(past.name, device, device_id, past.dtype, shape, address)
            binding.bind_output(present_name(past.name), device, device_id, past.dtype, shape, address)

    def _address(self, past: PastInput) -> int:
        if self.graph.cache_device is None:
            return self.host[past.name].ctypes.data
        return self.device[past.name].data_ptr()

    def copy_rows(self, source: np.ndarray, target: np.ndarray, used: int) -> None:
        """Copies the first `used` positions of rows `source` into rows `target`."""
        for array in self.host.values():
            array[target, :, :used] = array[source, :, :used]
        # ONNX Runtime has no copy between OrtValues outside a graph: device rows go through the
        # host, as DeviceCache.take does. Only beam search and finished rows need this.
        for value in self.device.values():
            array = value.numpy()
            array[target, :, :used] = array[source, :, :used]
            value.update_inplace(array)

    def release(self, first: int) -> None:
        """Rows [first, rows) hold nothing: their host memory goes back to the system."""
        for array in self.host.values():
            release_rows(array, first)

    def resized(self, length: int, rows_used: int, used: int) -> KVBuffers:
        """New buffers of `length` positions holding the first `used` positions of rows [0, rows_used)."""
        grown = KVBuffers(self.graph, self.rows, length)
        for name, array in self.host.items():
            grown.host[name][:rows_used, :, :used] = array[:rows_used, :, :used]
        for name, value in self.device.items():
            array = grown.device[name].numpy()
            array[:rows_used, :, :used] = value.numpy()[:rows_used, :, :used]
            grown.device[name].update_inplace(array)
        return grown


class FusedBatch:
    """Rows of key/value buffers with each row's length (tokens in its cache), run by prefills and
    decode steps over contiguous rows."""

    def __init__(self, graph: FusedGraph, rows: int, length: int) -> None:
        self.graph = graph
        rows += graph.pads_solo_runs  # the spare row, after the last row a caller can use
        self.buffers = KVBuffers(graph, rows, length)
        self.lengths = np.zeros(rows, dtype=np.int32)
        self.logits = zeroed_pages((rows, 1, graph.vocab), np.float32)
        # The last run's binding of its rows' buffers, kept for the next run of the same rows:
        # decode steps bind the same buffers every step, dozens of them (two per layer).
        self._binding: tuple[tuple[int, int, KVBuffers], ort.IOBinding] | None = None

    @property
    def length(self) -> int:
        return self.buffers.length

    def prefill(self, first: int, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Runs the prompts into rows [first, first + len(prompts)); their next-token logits."""
        lengths = np.array([len(prompt) for prompt in prompts], dtype=np.int32)
        input_ids = np.zeros((len(prompts), int(lengths.max())), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            input_ids[row, : len(prompt)] = prompt  # right-padded: every row's cache starts at 0
        self.lengths[first : first + len(prompts)] = lengths
        return self._run(first, input_ids, lengths - 1, input_ids.shape[1])

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """Feeds one token to each of rows [0, len(tokens)); their next-token logits."""
        past = self.lengths[: len(tokens)]
        logits = self._run(0, tokens.astype(np.int64)[:, None], past, int(past.max()) + 1)
        past += 1
        return logits

    def _run(self, first: int, input_ids: np.ndarray, seqlens_k: np.ndarray, total: int) -> np.ndarray:
        if not (self.graph.pads_solo_runs and input_ids.size == 1):
            return self._run_rows(first, input_ids, seqlens_k, total)
        # One token of one row: the row after it is free (rows in use are contiguous from 0, and
        # the buffers hold one more than callers use), so it runs the same token from position 0,
        # writing only its own cache, and the real row takes the kernels' path for batches.
        padded = self._run_rows(first, np.repeat(input_ids, 2, axis=0), np.append(seqlens_k, 0).astype(np.int32), total)
        return padded[:1]

    def _run_rows(self, first: int, input_ids: np.ndarray, seqlens_k: np.ndarray, total: int) -> np.ndarray:
        count = len(input_ids)
        binding = self._rows_binding(first, count)
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input(SEQLENS, seqlens_k)
        binding.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
        self.graph.session.session.run_with_iobinding(binding)
        # The caller's own copy (a row's logits are 1 MB for Gemma's vocabulary, a fraction of a
        # run): the buffer is written again by the next run, and callers may keep logits.
        return self.logits[first : first + count, 0].copy()

    def _rows_binding(self, first: int, count: int) -> ort.IOBinding:
        """A binding of rows [first, first + count)'s buffers and logits: the last run's when it
        ran the same rows of the same buffers (they move only when the buffers grow)."""
        key = (first, count, self.buffers)
        if self._binding is None or self._binding[0] != key:
            binding = self.graph.session.session.io_binding()
            self.bind(binding, first, count)
            logits = self.logits[first : first + count]
            binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
            self._binding = key, binding
        return self._binding[1]

    def bind(self, binding: ort.IOBinding, first: int, count: int) -> None:
        """Binds what rows [first, first + count) keep between runs (an encoder-decoder's rows
        also hold their encoder keys: cross.py)."""
        self.buffers.bind(binding, first, count)

    def copy_rows(self, source: np.ndarray, target: np.ndarray) -> None:
        """Rows `target` take the cache and length of rows `source` (taken before any is written)."""
        used = int(self.lengths[source].max(initial=0))
        self.buffers.copy_rows(source, target, used)
        self.lengths[target] = self.lengths[source]

    def keep(self, rows: np.ndarray) -> None:
        """Rows [0, len(rows)) become the given rows, in that order."""
        front = np.arange(len(rows))
        if not np.array_equal(rows, front):
            self.copy_rows(rows, front)

    def release(self, first: int) -> None:
        """Rows [first, ...) hold nothing (their sequences left): their memory goes back to the
        system. What a row computes does not change: a row taken again is prefilled from position
        0, and positions past its length are never read."""
        self.buffers.release(first)
        release_rows(self.logits, first)

    def grow(self, length: int, rows_used: int) -> None:
        """Makes room for `length` positions per row, keeping rows [0, rows_used)."""
        used = int(self.lengths[:rows_used].max(initial=0))
        self.buffers = self.buffers.resized(length, rows_used, used)


class FusedModel:
    """One request's prompts on the fused graph, alone: the StepModel of the decoding loops.
    `rows` is the most rows it will hold (prompts x beams), `length` its longest prompt plus
    max_new_tokens; `history` the left-padded prompts, as transformers sees them."""

    def __init__(
        self,
        graph: FusedGraph,
        prompts: Sequence[Sequence[int]],
        history: np.ndarray,
        timed: Timed,
        rows: int,
        length: int,
    ) -> None:
        self.prompts = prompts
        self.history = history
        self.timed = timed
        self.batch: FusedBatch | None = graph.batch(rows, length)

    def start(self) -> np.ndarray:
        return self.timed(lambda: self._batch().prefill(0, self.prompts))

    def step(self, tokens: np.ndarray) -> np.ndarray:
        return self.timed(lambda: self._batch().decode(tokens))

    def keep(self, rows: np.ndarray) -> None:
        self._batch().keep(rows)

    def release(self) -> None:
        self.batch = None

    def _batch(self) -> FusedBatch:
        if self.batch is None:
            raise RuntimeError("the fused model was released")
        return self.batch
