"""What the work costs: `Timings` per request (copied into the response's Metadata) and
`DecodingStats` per generation pipeline (what its decoding loops did, all requests together)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


@dataclass
class Timings:
    """What one request cost, stage by stage; copied into the response's Metadata."""

    tokens: int = 0
    tokenization_ns: int = 0
    queue_ns: int = 0
    inference_ns: int = 0
    postprocess_ns: int = 0
    batch_size: int = 0

    def timed(self, stage: str, work: Callable[[], T]) -> T:
        """Runs `work`, adding its duration to the `<stage>_ns` counter."""
        start = time.perf_counter_ns()
        try:
            return work()
        finally:
            setattr(self, f"{stage}_ns", getattr(self, f"{stage}_ns") + time.perf_counter_ns() - start)


@dataclass
class DecodingStats:
    """What a pipeline's generations did: `steps` each generation took (one token per row),
    `runs` of the model (prefills and decode steps; a shared decode step counts once, however many
    generations it advanced), and generations holding a cache (`active`)."""

    steps: int = 0
    runs: int = 0
    active: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, steps: int = 0, runs: int = 0, active: int = 0) -> None:
        with self._lock:
            self.steps += steps
            self.runs += runs
            self.active += active
