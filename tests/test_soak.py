"""Soak: `onnxserve serve` in its own process, driven open-loop at three times the rate it was
measured to sustain (at most MAX_RATE), for ONNXSERVE_SOAK_S seconds (60 by default; set it
higher for a longer soak). Each call carries several texts, so that inference, not gRPC's
per-call work, is what the load exceeds.

Every call must be answered OK, RESOURCE_EXHAUSTED (the bounded queue is full) or
DEADLINE_EXCEEDED; the server must still be healthy and exit cleanly afterwards; its resident
memory must stay within RSS_GROWTH_LIMIT of what it was once warmed up; and the metrics must show
requests merged into batches."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from onnxserve.client import AsyncClient

from tests.serving import Outcomes, ServerProcess, add_version, metric

KIND = "bert-sequence-classification"
SOAK_S = float(os.environ.get("ONNXSERVE_SOAK_S", "60"))
WARMUP_S = min(10.0, SOAK_S / 4)  # memory is compared with what it was at the end of this
RSS_GROWTH_LIMIT = 64 * 2**20
DEADLINE_S = 1.0
QUEUE_SIZE = 32
CONCURRENT_CALLS = 2 * QUEUE_SIZE
# An idle model holds a run this long for batchmates: the tiny test model runs a sequence in about
# a millisecond, less than gRPC spends on a call, so without it runs would rarely find company.
QUEUE_DELAY_MS = 10
# The offered rate, as a multiple of the capacity measured closed-loop: a lower bound, as each of its
# callers waits out a whole call (the queue delay included) before the next.
OVERLOAD = 3.0
# Calls per second at most: well within what one Python client and the server's gRPC layer handle
# beside each other on two cores, and (times DEADLINE_S) far fewer calls outstanding than the 1000
# that gRPC core holds for a server before it sheds the rest itself, as CANCELLED.
MAX_RATE = 400
TEXTS_PER_CALL = 4
TEXTS = ["A sentence of ordinary length, a few dozen tokens long, about nothing in particular " * 3] * TEXTS_PER_CALL


@pytest.fixture(scope="module")
def server(export, tmp_path_factory):
    folder = tmp_path_factory.mktemp("soak")
    add_version(export(KIND, precisions=("fp32",)), folder / "repository", KIND, 1)
    process = ServerProcess(
        "--repository", str(folder / "repository"), "--device", "cpu", "--max-queue-size", str(QUEUE_SIZE),
        "--max-concurrent-calls", str(CONCURRENT_CALLS), "--max-queue-delay-ms", str(QUEUE_DELAY_MS),
        "--poll-interval-s", "0", log_path=folder / "server.log",
    )
    yield process
    process.close()


async def capacity(target: str, seconds: float = 3, concurrency: int = QUEUE_SIZE) -> float:
    """Calls per second the server completes when kept busy (closed loop, no deadlines; no more
    callers than the queue holds, so that none is refused)."""
    done = 0
    stop_at = time.monotonic() + seconds

    async def caller(client: AsyncClient) -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            await client.classify(model=KIND, texts=TEXTS)
            done += 1

    async with AsyncClient(target, timeout=60) as client:
        await asyncio.gather(*(caller(client) for _ in range(concurrency)))
    return done / seconds


async def open_loop(target: str, rate: float, seconds: float, outcomes: Outcomes) -> int:
    """Starts calls at `rate` per second whatever the answers, as independent clients do."""
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Future] = set()
    started = 0
    async with AsyncClient(target, timeout=DEADLINE_S) as client:
        begin = loop.time()
        while (elapsed := loop.time() - begin) < seconds:
            while started < elapsed * rate:
                task = asyncio.ensure_future(outcomes.call(client.classify(model=KIND, texts=TEXTS)))
                pending.add(task)
                task.add_done_callback(pending.discard)
                started += 1
            await asyncio.sleep(0.002)
        await asyncio.gather(*pending)
    return started


async def watch(server: ServerProcess, seconds: float, samples: dict[str, list]) -> None:
    """Resident memory and queue depth, once a second."""
    loop = asyncio.get_running_loop()
    begin = loop.time()
    while loop.time() - begin < seconds:
        samples["rss"].append((loop.time() - begin, server.rss_bytes()))
        depth = await loop.run_in_executor(None, metric, server.metrics_port, "onnxserve_queue_depth")
        samples["depth"].append(depth)
        await asyncio.sleep(1)


def test_soak_above_capacity(server):
    measured = asyncio.run(capacity(server.target))
    rate = min(OVERLOAD * measured, MAX_RATE)
    outcomes = Outcomes()
    samples: dict[str, list] = {"rss": [], "depth": []}

    async def soak() -> int:
        started, _ = await asyncio.gather(
            open_loop(server.target, rate, SOAK_S, outcomes), watch(server, SOAK_S, samples)
        )
        return started

    started = asyncio.run(soak())
    warmed = next(rss for at, rss in samples["rss"] if at >= WARMUP_S)
    peak = max(rss for at, rss in samples["rss"] if at >= WARMUP_S)
    batches = metric(server.metrics_port, "onnxserve_batch_size_count", model=KIND)
    rows = metric(server.metrics_port, "onnxserve_batch_size_sum", model=KIND)
    print(
        f"\nsoak: {SOAK_S:.0f} s at {rate:.0f} calls/s (capacity {measured:.0f}/s); {started} calls: "
        f"{dict(outcomes.counts)}; RSS {warmed / 2**20:.0f} MiB after warm-up, peak {peak / 2**20:.0f} MiB; "
        f"{rows / batches:.1f} sequences per run; queue depth up to {max(samples['depth']):.0f}"
    )
    assert server.process.poll() is None, "the server exited during the soak"
    assert sum(outcomes.counts.values()) == started
    assert not outcomes.unexpected("OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"), outcomes.details
    assert outcomes.counts["OK"] > 0
    if rate < MAX_RATE:  # past it, the client rather than the server may be the bottleneck
        overloaded = outcomes.counts["RESOURCE_EXHAUSTED"] + outcomes.counts["DEADLINE_EXCEEDED"]
        assert overloaded > 0, "the server kept up, so the load was not above its capacity"
    assert peak - warmed <= RSS_GROWTH_LIMIT, f"RSS grew by {(peak - warmed) / 2**20:.0f} MiB after warm-up"
    # Batching at work: calls were merged into runs of several.
    assert rows / batches > 1.5 * TEXTS_PER_CALL
    assert max(samples["depth"]) > 0
    assert asyncio.run(capacity(server.target, seconds=0.5, concurrency=1)) > 0, "a call after the soak failed"
    assert server.terminate() == 0
