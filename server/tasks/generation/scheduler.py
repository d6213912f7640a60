"""Continuous batching: the concurrent generations of one fused decoder share its decode steps.

Iteration-level scheduling, as TGI and vLLM do it. One loop per model, on a thread of the
scheduler's own while there is work (as the batcher runs encoders), repeats: drop the rows whose
sequence ended or whose caller left (the last row moves into the hole, so the rows in use stay
contiguous and a finished row costs nothing); prefill waiting requests, each alone, into free rows
of the shared KV buffers (first come, first served, while rows are free); then run one decode step
over every row in use and hand each request the logits of its own rows. So a request joins the
running batch at the next step after it arrives and leaves it at once when it ends. Which row holds
which sequence is kept by a `RowTable` (rows.py).

Each request keeps its own decoding state: its logits processors, sampler and seed, stopping
criteria and outputs, driven by the same decoding loop (`decoding.decode`) as a request decoded
alone, over a `SharedRows` step model whose logits come from the shared runs. Beam search
reorders its rows every step and runs on its own step model instead (drivers.py)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from onnxserve.server.errors import ResourceExhausted
from onnxserve.server.runtime.stats import DecodingStats, Timings
from onnxserve.server.tasks.generation.decoding import Decoding, decode
from onnxserve.server.tasks.generation.fused import FusedBatch, FusedGraph
from onnxserve.server.tasks.generation.rows import RowTable
from onnxserve.server.tasks.generation.stopping import OutputSequence

log = logging.getLogger(__name__)


class SharedRows:
    """The StepModel of one request inside the shared batch: the scheduler runs the model and
    leaves each run's logits for the request's rows here before the decoding loop asks for them."""

    def __init__(self, history: np.ndarray) -> None:
        self.history = history
        self.logits = np.empty((0, 0), dtype=np.float32)

    def start(self) -> np.ndarray:
        return self.logits

    def step(self, tokens: np.ndarray) -> np.ndarray:
        return self.logits

    def keep(self, rows: np.ndarray) -> None:
        """Nothing to move: the scheduler frees a finished row before the next step."""

    def release(self) -> None:
        """The scheduler frees the rows when the request leaves."""


@dataclass(eq=False)
class SharedRequest:
    """One generation submitted to the scheduler. `on_step` runs on the scheduler's thread after
    each of its steps, `on_end` once when it leaves the batch (None: it ended; else the error)."""

    prompts: Sequence[Sequence[int]]
    history: np.ndarray  # the left-padded prompts, as its logits processors see them
    outputs: Sequence[OutputSequence]
    decoding: Decoding
    timings: Timings
    on_step: Callable[[], None]
    on_end: Callable[[BaseException | None], None]
    # An encoder-decoder's rows (cross.py): each row's encoder states, which its decoder attends to.
    encoder_states: np.ndarray | None = None
    cancelled: bool = False
    submitted_ns: int = field(default_factory=time.perf_counter_ns)
    model: SharedRows = field(init=False)
    steps: Iterator[None] = field(init=False)

    @property
    def length(self) -> int:
        """Cache positions its longest row needs."""
        return max(len(prompt) for prompt in self.prompts) + self.decoding.max_new_tokens

    def live(self) -> list[int]:
        """Output indices still decoding, in order: the rows the decoding loop steps next."""
        return [index for index, output in enumerate(self.outputs) if not output.finished]


class Scheduler:
    """The shared batch of one fused decoder (model `name`): at most `max_rows` rows decode
    together, at most `max_waiting` requests wait for rows (one more is refused with
    RESOURCE_EXHAUSTED); `context` caps the buffer length."""

    def __init__(
        self, name: str, graph: FusedGraph, max_rows: int, max_waiting: int, context: int, stats: DecodingStats
    ) -> None:
        self.graph = graph
        self.max_rows = max_rows
        self.max_waiting = max_waiting
        self.context = context
        self.stats = stats
        self._lock = threading.Lock()
        self._waiting: deque[SharedRequest] = deque()
        self._looping = False
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"onnxserve-decode-{name}")
        # Touched by the loop's thread only:
        self._running: list[SharedRequest] = []
        self._rows: RowTable[SharedRequest] = RowTable(max_rows)
        self._batch: FusedBatch | None = None

    @property
    def waiting(self) -> int:
        """Requests waiting for free rows."""
        return len(self._waiting)

    def fits(self, rows: int) -> bool:
        return rows <= self.max_rows

    def submit(self, request: SharedRequest) -> None:
        """Queues the request; the loop starts on the scheduler's thread if it is not running."""
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise ResourceExhausted(
                    f"{len(self._waiting)} generations are waiting for a free row of the shared batch, "
                    "the model's max_queue_size; retry later"
                )
            self._waiting.append(request)
            if not self._looping:
                self._thread.submit(self._loop)
                self._looping = True

    def close(self) -> None:
        """Lets the thread go once the loop (if any) ends; calls have drained before a model closes."""
        self._thread.shutdown(wait=False, cancel_futures=True)

    def cancel(self, request: SharedRequest) -> None:
        """The caller left: a waiting request leaves the queue now, a running one before the next step."""
        request.cancelled = True
        with self._lock:
            if request in self._waiting:
                self._waiting.remove(request)

    def _loop(self) -> None:
        try:
            while self._iteration():
                pass
        except Exception as error:
            # A bug, not a request's failure (those leave on their own): every request fails with
            # it rather than wait forever, and the next one starts a fresh loop.
            log.exception("the shared decoding loop failed")
            self._fail_all(error)
            with self._lock:
                waiting, self._waiting, self._looping = list(self._waiting), deque(), False
            for request in waiting:
                request.on_end(error)

    def _iteration(self) -> bool:
        """One scheduling step; False once nothing runs or waits (the loop then ends)."""
        self._admit()
        self._drop_ended()  # before the step: sequences that ended at their first token, callers that left
        if not self._running:
            with self._lock:
                if not self._waiting:
                    self._looping = False
                    self._batch = None  # an idle model holds no cache
                    return False
            return True
        self._decode()
        self._drop_ended()  # after it: the rows are free for the next admissions
        return True

    def _drop_ended(self) -> None:
        """Frees the rows of finished sequences and of requests whose caller left, and their memory."""
        ended = [request for request in self._running if request.cancelled or not request.live()]
        holders = self._rows.holders()
        for row in reversed(range(len(holders))):
            request, index = holders[row]
            if request in ended or request.outputs[index].finished:
                self._free(row)
        if self._rows.used < len(holders):
            self._batch.release(self._rows.used)
        for request in ended:
            self._running.remove(request)
            self._leave(request, None)

    def _free(self, row: int) -> None:
        """The last row in use moves into `row`, cache and all, so that the rows in use stay [0, n)."""
        moved = self._rows.free(row)
        if moved is not None:
            self._batch.copy_rows(np.array([moved]), np.array([row]))

    def _admit(self) -> None:
        """Prefills waiting requests into free rows, in order, while the next one fits."""
        while True:
            with self._lock:
                if not self._waiting or not self._rows.fits(len(self._waiting[0].prompts)):
                    return
                request = self._waiting.popleft()
            self._start(request)

    def _start(self, request: SharedRequest) -> None:
        first = self._rows.used
        request.timings.queue_ns = time.perf_counter_ns() - request.submitted_ns
        request.model = SharedRows(request.history)
        request.steps = decode(request.model, request.outputs, request.decoding)
        self.stats.add(active=1)
        try:
            self._make_room(request.length)
            request.model.logits = self._timed([request], lambda: self._prefill(first, request))
        except Exception as error:  # the request fails with it; the batch goes on
            self._leave(request, error)
            return
        self._rows.take(request, len(request.prompts))
        request.timings.batch_size = max(request.timings.batch_size, self._rows.used)
        self._running.append(request)
        self._advance(request)

    def _prefill(self, first: int, request: SharedRequest) -> np.ndarray:
        """The request's rows join the batch: causal rows with their prompts; encoder-decoder rows
        also with their encoder states (the batch then is a CrossBatch)."""
        if request.encoder_states is None:
            return self._batch.prefill(first, request.prompts)
        return self._batch.prefill(first, request.prompts, request.encoder_states)

    def _make_room(self, length: int) -> None:
        """Buffers of at least `length` positions: doubled when they grow, so growing is rare."""
        if self._batch is None:
            self._batch = self.graph.batch(self.max_rows, length)
        elif length > self._batch.length:
            self._batch.grow(min(max(length, 2 * self._batch.length), self.context), self._rows.used)

    def _decode(self) -> None:
        """One decode step over every row in use; each request then chooses its next tokens."""
        tokens = np.array([request.outputs[index].tokens[-1] for request, index in self._rows.holders()])
        try:
            logits = self._timed(self._running, lambda: self._batch.decode(tokens))
        except Exception as error:  # the shared cache is lost: every request fails
            self._fail_all(error)
            return
        for request in list(self._running):
            request.model.logits = logits[self._rows.rows(request, request.live())]
            request.timings.batch_size = max(request.timings.batch_size, len(tokens))
            self._advance(request)

    def _advance(self, request: SharedRequest) -> None:
        """The request's decoding loop takes its logits: chooses, appends and checks its tokens."""
        started = time.perf_counter_ns()
        try:
            next(request.steps)
        except Exception as error:  # a failing request leaves; the others go on
            for source, target in self._rows.free_owner(request):
                self._batch.copy_rows(np.array([source]), np.array([target]))
            self._batch.release(self._rows.used)
            self._running.remove(request)
            self._leave(request, error)
            return
        request.timings.postprocess_ns += time.perf_counter_ns() - started
        self.stats.add(steps=1)
        request.on_step()

    def _timed(self, requests: Sequence[SharedRequest], run: Callable[[], np.ndarray]) -> np.ndarray:
        started = time.perf_counter_ns()
        logits = run()
        elapsed = time.perf_counter_ns() - started
        for request in requests:
            request.timings.inference_ns += elapsed
        self.stats.add(runs=1)
        return logits

    def _fail_all(self, error: BaseException) -> None:
        for request in self._running:
            self._leave(request, error)
        self._rows.clear()
        self._running, self._batch = [], None

    def _leave(self, request: SharedRequest, error: BaseException | None) -> None:
        request.steps.close()
        self.stats.add(active=-1)
        request.on_end(error)
