"""The forward step's scheduler: splits a request's sequences into ONNX Runtime runs bounded by
a batch size and a token budget, and runs them off the event loop, one run per model at a time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

from onnxserve.server.tasks.base import RowOutputs, Timings
from tokenizers import Encoding

Forward = Callable[[Sequence[Encoding]], list[RowOutputs]]


def plan_runs(lengths: Sequence[int], max_batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Groups sequence indices into runs. Sorting by length keeps padding small; a run's cost is
    its padded size (rows x longest row), which must stay within the token budget."""
    runs: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        padded = (len(current) + 1) * lengths[index]
        if current and (len(current) >= max_batch_size or padded > max_batch_tokens):
            runs.append(current)
            current = []
        current.append(index)
    if current:
        runs.append(current)
    return runs


class BatchRunner:
    def __init__(
        self, forward: Forward, max_batch_size: int, max_batch_tokens: int, executor: Executor
    ) -> None:
        self.forward = forward
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.executor = executor
        self._lock = asyncio.Lock()

    async def infer(self, sequences: Sequence[Encoding], timings: Timings) -> list[RowOutputs]:
        """Runs every sequence and returns their outputs in the order given."""
        outputs: list[RowOutputs | None] = [None] * len(sequences)
        loop = asyncio.get_running_loop()
        lengths = [len(s.ids) for s in sequences]
        for run in plan_runs(lengths, self.max_batch_size, self.max_batch_tokens):
            waited = time.perf_counter_ns()
            async with self._lock:
                timings.queue_ns += time.perf_counter_ns() - waited
                started = time.perf_counter_ns()
                rows = await loop.run_in_executor(self.executor, self.forward, [sequences[i] for i in run])
                timings.inference_ns += time.perf_counter_ns() - started
            timings.batch_size = max(timings.batch_size, len(run))
            for index, row in zip(run, rows, strict=True):
                outputs[index] = row
        return outputs  # type: ignore[return-value]
