"""Dynamic batching per model.

Requests from every caller of a model wait in one bounded queue; each ONNX Runtime run takes
sequences from as many of them as fit, sorted by length so that little is padded, within a batch
size and a token budget (rows x longest row). Each request gets its own rows back, in its order; a
request larger than one run is spread over several, which take turns with other callers' runs.
Runs go one at a time per model (a run already uses every intra-op thread) on a thread of the
model's own, so that nothing heavy runs on the event loop and no other work (tokenizing, another
model, generation) can hold them back. An idle model runs what waits at once; the next run forms
while one executes. How runs are planned, and what was measured: docs/batching.md."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from onnxserve.server.config.settings import ModelSettings
from onnxserve.server.errors import DeadlineExceeded, ResourceExhausted
from onnxserve.server.runtime.stats import Timings
from onnxserve.server.runtime.tokenizer import TextTokenizer
from tokenizers import Encoding

from onnxserve.v1 import common_pb2

log = logging.getLogger(__name__)

#: One sequence's outputs by name, cut to its own tokens.
RowOutputs = dict[str, np.ndarray]
Forward = Callable[[Sequence[Encoding]], list[RowOutputs]]

#: A run is cut before more than half of it would be padding: a run costs its padded size, so
#: padding many short rows up to one long row costs more than the extra run that splitting adds.
MIN_USEFUL_SHARE = 0.5
#: Each run is planned over the oldest waiting sequences, this many batches' worth: enough to
#: group by length, few enough to plan in microseconds however long the queue.
WINDOW_BATCHES = 4
#: Requests are merged only into runs of a model whose outputs move less than this (relative L2
#: error) between running alone and beside batchmates: inside the answer gates, far above fp32's
#: rounding (the measurements are in docs/batching.md).
DRIFT_LIMIT = 1e-3
#: fp16's own limit: other batch shapes reorder its sums (on a GPU, other kernels and tilings),
#: each by about fp16's rounding step (5e-4), which may add up past 1e-3 over a deep model; 1e-2
#: stays far inside fp16's gate (min cosine 0.999, about 4% relative L2) and far below the 0.16 of
#: per-tensor int8 that the probe exists to catch (docs/gpu.md).
DRIFT_LIMITS = {common_pb2.PRECISION_FP16: 1e-2}
#: What the drift probe runs: a short text alone, then beside long and varied ones (which widen
#: any activation range taken over the whole batch, and pad the short one).
PROBE_TEXTS = (
    "A short probe.",
    "Numbers like 3.14159, 2,718 and 1e-9 sit beside CAPITALS, émojis 🚀🙂, punctuation?!; "
    "tabs\tand   spaces, URLs such as https://example.com/a?b=c, and very long words "
    "like antidisestablishmentarianism or pneumonoultramicroscopicsilicovolcanoconiosis. " * 2,
    "Zürich, São Paulo, 東京, 서울 and Kraków: a list of places with accents and scripts, "
    "followed by code `x = f(y) ** 2 // 7` and a quote, 'to be or not to be'. " * 2,
)


def plan_runs(lengths: Sequence[int], max_batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Groups sequence indices into runs, shortest first. A run is cut when it holds
    max_batch_size rows, when its padded size (rows x longest row) would pass max_batch_tokens, or
    when more than half of it would be padding. A single sequence over the budget runs alone."""
    runs: list[list[int]] = []
    current: list[int] = []
    useful = 0
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        length = lengths[index]
        padded = (len(current) + 1) * length
        full = len(current) >= max_batch_size or padded > max_batch_tokens
        if current and (full or useful + length < MIN_USEFUL_SHARE * padded):
            runs.append(current)
            current, useful = [], 0
        current.append(index)
        useful += length
    if current:
        runs.append(current)
    return runs


def batchmate_drift(forward: Forward, sequences: Sequence[Encoding]) -> float:
    """How far the first sequence's outputs move when it runs beside the others instead of alone:
    the largest relative L2 error over its outputs."""
    alone = forward(sequences[:1])[0]
    beside = forward(sequences)[0]
    return max(_relative_error(alone[name], beside[name]) for name in alone)


def _relative_error(reference: np.ndarray, value: np.ndarray) -> float:
    reference, value = reference.astype(np.float64), value.astype(np.float64)
    return float(np.linalg.norm(value - reference) / max(float(np.linalg.norm(reference)), 1e-12))


def merges_safely(name: str, forward: Forward, tokenizer: TextTokenizer, precision: int) -> bool:
    """Whether the model's answers stay within the gate whatever they are batched with. Measured at
    load rather than read from the recipe, so any variant that depends on its batchmates is caught;
    the limit is the served precision's (`precision`, a manifest Precision)."""
    return drift_within_limit(name, batchmate_drift(forward, tokenizer.encode(PROBE_TEXTS)), precision, "texts")


def drift_within_limit(name: str, drift: float, precision: int, inputs: str) -> bool:
    """Whether a batchmate drift measured on `inputs` (texts, images, audios) is within the
    served precision's limit; where it is not, a warning says the model's requests run alone."""
    limit = DRIFT_LIMITS.get(precision, DRIFT_LIMIT)
    if drift <= limit:
        return True
    log.warning(
        "model %s: outputs move by %.3g (relative) when batched with other %s, over the limit of "
        "%.0e; its requests will not be batched together (each runs with its own %s only)",
        name, drift, inputs, limit, inputs,
    )  # fmt: skip
    return False


@dataclass(eq=False)
class _Request:
    """One caller's sequences on their way through the queue."""

    sequences: Sequence[Encoding]
    timings: Timings
    done: asyncio.Future
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)
    started: bool = False
    lengths: list[int] = field(init=False)
    outputs: list[RowOutputs | None] = field(init=False)
    queued: deque[int] = field(init=False)  # its sequences not yet taken into a run, in order
    unfinished: int = field(init=False)  # sequences whose run has not returned

    def __post_init__(self) -> None:
        self.lengths = [len(sequence) for sequence in self.sequences]
        self.outputs = [None] * len(self.sequences)
        self.queued = deque(range(len(self.sequences)))
        self.unfinished = len(self.sequences)


class _Item(NamedTuple):
    """One waiting sequence: its request and its place there."""

    request: _Request
    index: int
    length: int


class BatchRunner:
    """A model's queue and the loop that turns it into runs.

    `merge_requests` False keeps each run to one request's sequences, for variants whose answers
    would depend on their batchmates."""

    def __init__(self, name: str, forward: Forward, settings: ModelSettings, merge_requests: bool = True) -> None:
        self.name = name
        self.forward = forward
        self.settings = settings
        self.merge_requests = merge_requests
        #: Requests with sequences not yet taken into a run, in turn order (see _take).
        self._queue: deque[_Request] = deque()
        self._waiting = 0
        self._arrived = asyncio.Event()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"onnxserve-run-{name}")
        self._task: asyncio.Task | None = None
        #: Called after each run with its rows and padded tokens; the server's metrics hook.
        self.on_run: Callable[[int, int], None] | None = None

    @property
    def waiting(self) -> int:
        """Requests in the queue: those with sequences not yet taken into a run."""
        return self._waiting

    async def infer(
        self, sequences: Sequence[Encoding], timings: Timings, timeout: float | None = None
    ) -> list[RowOutputs]:
        """Runs every sequence and returns their outputs in the order given, filling the queue,
        inference and batch-size timings. `timeout` is the caller's remaining time in seconds:
        a request still waiting when it runs out is dropped with DeadlineExceeded."""
        if not sequences:
            return []
        if timeout is not None and timeout <= 0:
            raise DeadlineExceeded(f"the deadline passed before the request reached model {self.name!r}")
        if self._waiting >= self.settings.max_queue_size:
            raise ResourceExhausted(
                f"model {self.name!r} has {self._waiting} requests waiting, its max_queue_size; retry later"
            )
        request = _Request(sequences, timings, asyncio.get_running_loop().create_future())
        self._admit(request)
        try:
            return await asyncio.wait_for(request.done, timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"the deadline passed while waiting for model {self.name!r}") from None
        finally:
            self._release(request)

    async def close(self) -> None:
        """Stops the batching loop; calls still waiting are cancelled by the server's shutdown."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._thread.shutdown(wait=False, cancel_futures=True)

    def _admit(self, request: _Request) -> None:
        self._waiting += 1
        self._queue.append(request)
        self._arrived.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._serve(), name=f"batching {self.name}")

    def _release(self, request: _Request) -> None:
        """Frees the place of a request that leaves with sequences still waiting (cancelled, past
        its deadline, or failed); those sequences are skipped when they come up."""
        if request.queued:
            request.queued.clear()
            self._waiting -= 1

    async def _serve(self) -> None:
        while True:
            await self._execute(await self._next_run())

    async def _next_run(self) -> list[_Item]:
        """Waits for work, then takes the next run off the queue."""
        while True:
            self._arrived.clear()
            window = self._window()
            delay = None
            if window:
                run = self._choose(window)
                delay = self._time_for_batchmates(window, run)
                if delay <= 0:
                    return self._take(window, run)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), delay)

    def _window(self) -> list[_Item]:
        """The first waiting sequences of live requests in turn order, at most WINDOW_BATCHES
        batches' worth; only the first request's when requests are not merged. Nothing is taken
        off the queue here (see _take)."""
        while self._queue and not self._queue[0].queued:
            self._queue.popleft()  # scheduled whole, or its caller left (_release freed its place)
        limit = WINDOW_BATCHES * self.settings.max_batch_size
        window: list[_Item] = []
        for request in self._queue:
            if not request.queued:
                continue
            for index in itertools.islice(request.queued, limit - len(window)):
                window.append(_Item(request, index, request.lengths[index]))
            if len(window) >= limit or not self.merge_requests:
                break
        return window

    def _choose(self, window: list[_Item]) -> list[int]:
        """The planned run that carries the first sequence in turn order, so that none waits forever."""
        runs = plan_runs([item.length for item in window], self.settings.max_batch_size, self.settings.max_batch_tokens)
        return next(run for run in runs if 0 in run)

    def _time_for_batchmates(self, window: list[_Item], run: list[int]) -> float:
        """Seconds an idle model holds a run that could still grow, so that more requests join it:
        up to max_queue_delay_ms after the oldest one arrived."""
        longest = max(window[i].length for i in run)
        can_grow = (
            self.merge_requests
            and len(run) == len(window)
            and len(run) < self.settings.max_batch_size
            and (len(run) + 1) * longest <= self.settings.max_batch_tokens
        )
        if not can_grow:
            return 0.0
        waited_ns = time.perf_counter_ns() - window[0].request.enqueued_ns
        return self.settings.max_queue_delay_ms / 1e3 - waited_ns / 1e9

    def _take(self, window: list[_Item], run: list[int]) -> list[_Item]:
        """Takes the run's items off the queue, then gives the requests it served, if they still
        have sequences waiting, the last turns: a long request is spread over runs that alternate
        with other callers' runs, so that a short call never waits for all of a long one."""
        items = [window[i] for i in run]
        chosen = {(id(item.request), item.index) for item in items}
        window_share: dict[_Request, int] = {}
        for item in window:
            window_share[item.request] = window_share.get(item.request, 0) + 1
        for request, share in window_share.items():  # the window is each request's first `share`
            kept = [i for i in itertools.islice(request.queued, share) if (id(request), i) not in chosen]
            for _ in range(share):
                request.queued.popleft()
            request.queued.extendleft(reversed(kept))
            if not request.queued:
                self._waiting -= 1
        served = {item.request for item in items}
        later = [request for request in self._queue if request in served and request.queued]
        if later:
            self._queue = deque(request for request in self._queue if request not in served and request.queued)
            self._queue.extend(later)
        return items

    async def _execute(self, items: list[_Item]) -> None:
        """Runs one batch on the model's thread and hands each request its rows."""
        requests = list(dict.fromkeys(item.request for item in items))
        started = time.perf_counter_ns()
        for request in requests:
            if not request.started:
                request.started = True
                request.timings.queue_ns = started - request.enqueued_ns
        sequences = [item.request.sequences[item.index] for item in items]
        loop = asyncio.get_running_loop()
        try:
            rows = await loop.run_in_executor(self._thread, self.forward, sequences)
        except Exception as error:  # the run's requests fail with it; the others go on
            for request in requests:
                if not request.done.done():
                    request.done.set_exception(error)
            return
        elapsed = time.perf_counter_ns() - started
        if self.on_run is not None:
            self.on_run(len(items), len(items) * max(item.length for item in items))
        for request in requests:
            request.timings.inference_ns += elapsed
            request.timings.batch_size = max(request.timings.batch_size, len(items))
        for item, row in zip(items, rows, strict=True):
            self._deliver(item, row)

    @staticmethod
    def _deliver(item: _Item, row: RowOutputs) -> None:
        request = item.request
        request.outputs[item.index] = row
        request.unfinished -= 1
        if request.unfinished == 0 and not request.done.done():
            request.done.set_result(request.outputs)
