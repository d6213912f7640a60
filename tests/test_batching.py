"""Dynamic batching: requests merged into shared runs, each caller's rows back in order, the token
budget, the bounded queue and deadlines. The runner is driven directly with a fake forward (runs
are held open with an event, never timed), then through gRPC on a tiny exported model."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from onnxserve.server.config.settings import ModelSettings
from onnxserve.server.errors import DeadlineExceeded, ResourceExhausted
from onnxserve.server.runtime.batching import BatchRunner, batchmate_drift, plan_runs
from onnxserve.server.runtime.stats import Timings
from onnxserve.server.tasks.images import PixelValues
from tokenizers import Encoding, Tokenizer, models, pre_tokenizers

from tests.checkpoints import CORPUS

# A word-level vocabulary: "tN" tags a text, each "w" adds a token, so lengths are exact.
_TOKENIZER = Tokenizer(models.WordLevel({"[UNK]": 0, "w": 1, **{f"t{i}": 2 + i for i in range(200)}}, "[UNK]"))
_TOKENIZER.pre_tokenizer = pre_tokenizers.Whitespace()


def texts(*lengths: int, first_tag: int = 0) -> list[Encoding]:
    """Sequences of the given lengths, tagged first_tag, first_tag + 1, ... by their first token."""
    return _TOKENIZER.encode_batch([" ".join([f"t{first_tag + i}"] + ["w"] * (n - 1)) for i, n in enumerate(lengths)])


class FakeForward:
    """Answers each row with its own token ids and records every run; with `hold`, runs wait until
    `release` is set, so that requests pile up in the queue meanwhile."""

    def __init__(self, hold: bool = False) -> None:
        self.runs: list[list[list[int]]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, sequences: Sequence[Encoding]) -> list[dict[str, np.ndarray]]:
        self.runs.append([list(e.ids) for e in sequences])
        self.entered.set()
        assert self.release.wait(30), "the test never released the held run"
        return [{"ids": np.array(e.ids)} for e in sequences]

    def ran(self, sequence: Encoding) -> bool:
        return any(list(sequence.ids) in run for run in self.runs)


def drive(scenario: Callable[[BatchRunner, FakeForward], object], hold: bool = False, **settings: object):
    """Runs `scenario(runner, forward)` on a fresh event loop, then closes the runner."""

    async def main():
        forward = FakeForward(hold)
        runner = BatchRunner("fake", forward, ModelSettings(**settings))
        try:
            return await scenario(runner, forward)
        finally:
            forward.release.set()
            await runner.close()

    return asyncio.run(main())


async def started(forward: FakeForward) -> None:
    await asyncio.to_thread(forward.entered.wait, 30)


async def queued(runner: BatchRunner, count: int) -> None:
    while runner.waiting < count:
        await asyncio.sleep(0.001)


def ids_of(sequences: Sequence[Encoding]) -> list[list[int]]:
    return [list(e.ids) for e in sequences]


def test_plan_runs_respects_size_budget_and_padding():
    lengths = [5, 40, 6, 7, 5, 41, 6, 300]
    runs = plan_runs(lengths, max_batch_size=3, max_batch_tokens=100)
    assert sorted(i for run in runs for i in run) == list(range(len(lengths)))
    for run in runs:
        longest = max(lengths[i] for i in run)
        assert len(run) <= 3
        assert len(run) == 1 or len(run) * longest <= 100
        assert len(run) == 1 or sum(lengths[i] for i in run) >= 0.5 * len(run) * longest
    assert [300] in [[lengths[i] for i in run] for run in runs]  # over the budget: alone


def test_concurrent_requests_share_runs_and_get_their_own_rows_in_order():
    requests = [texts(3, 5, 4, first_tag=0), texts(5, first_tag=10), texts(6, 4, first_tag=20)]

    async def scenario(runner, forward):
        blocker = asyncio.create_task(runner.infer(texts(4, first_tag=100), Timings()))
        await started(forward)
        timings = [Timings() for _ in requests]
        calls = [asyncio.create_task(runner.infer(r, t)) for r, t in zip(requests, timings, strict=True)]
        await queued(runner, len(requests))
        forward.release.set()
        await blocker
        return await asyncio.gather(*calls), timings, forward.runs

    outputs, timings, runs = drive(scenario, hold=True)
    for request, rows in zip(requests, outputs, strict=True):
        assert [list(row["ids"]) for row in rows] == ids_of(request)
    assert len(runs) == 2 and len(runs[1]) == 6  # the held run, then one run for all three requests
    assert all(t.batch_size == 6 and t.inference_ns > 0 and t.queue_ns > 0 for t in timings)


def test_an_idle_model_runs_a_lone_call_at_once():
    """The default holds nothing back: the run starts with nothing else arriving (the run is
    held open, so the call is seen inside the engine, not merely answered), and a call arriving
    while it runs forms the next run as soon as it ends."""
    assert ModelSettings().max_queue_delay_ms == 0

    async def scenario(runner, forward):
        lone = asyncio.create_task(runner.infer(texts(3, first_tag=0), Timings()))
        await started(forward)
        assert runner.waiting == 0 and forward.runs == [ids_of(texts(3, first_tag=0))]
        later = asyncio.create_task(runner.infer(texts(3, first_tag=1), Timings()))
        await queued(runner, 1)
        forward.release.set()
        await asyncio.gather(lone, later)
        return forward.runs

    assert drive(scenario, hold=True) == [ids_of(texts(3, first_tag=0)), ids_of(texts(3, first_tag=1))]


def test_a_long_request_takes_turns_with_calls_that_arrive_after_it():
    """Ten sequences in runs of two: a one-text call queued behind them rides the second run
    instead of waiting for all five of the long request's runs."""
    long, short = texts(*[3] * 10, first_tag=0), texts(3, first_tag=50)

    async def scenario(runner, forward):
        blocker = asyncio.create_task(runner.infer(texts(3, first_tag=100), Timings()))
        await started(forward)
        calls = [asyncio.create_task(runner.infer(long, Timings()))]
        await queued(runner, 1)
        calls.append(asyncio.create_task(runner.infer(short, Timings())))
        await queued(runner, 2)
        forward.release.set()
        await blocker
        rows = await asyncio.gather(*calls)
        return rows, forward.runs[1:]

    (long_rows, short_rows), runs = drive(scenario, hold=True, max_batch_size=2)
    assert [list(row["ids"]) for row in long_rows] == ids_of(long)
    assert [list(row["ids"]) for row in short_rows] == ids_of(short)
    assert runs[0] == ids_of(long[:2]) and ids_of(short)[0] in runs[1]
    assert len(runs) == 6 and all(len(run) <= 2 for run in runs)


def test_max_queue_delay_lets_an_idle_model_wait_for_batchmates():
    async def scenario(runner, forward):
        timings = [Timings() for _ in range(4)]
        calls = [runner.infer(texts(3, first_tag=i), timings[i]) for i in range(4)]
        await asyncio.gather(*calls)
        return timings, forward.runs

    timings, runs = drive(scenario, max_batch_size=4, max_queue_delay_ms=60_000)
    assert len(runs) == 1 and [t.batch_size for t in timings] == [4] * 4


def test_a_request_over_the_token_budget_is_split_and_keeps_its_order():
    request = texts(*[8, 3, 8, 5, 8, 8, 2, 8, 8, 6], first_tag=0)

    async def scenario(runner, forward):
        timings = Timings()
        rows = await runner.infer(request, timings)
        return rows, timings, forward.runs

    rows, timings, runs = drive(scenario, max_batch_tokens=32)
    assert [list(row["ids"]) for row in rows] == ids_of(request)
    assert len(runs) > 1
    assert all(len(run) * max(map(len, run)) <= 32 for run in runs)
    assert timings.batch_size == max(map(len, runs))


def test_a_full_queue_refuses_at_once():
    async def scenario(runner, forward):
        running = asyncio.create_task(runner.infer(texts(2, first_tag=0), Timings()))
        await started(forward)
        waiting = [asyncio.create_task(runner.infer(texts(2, first_tag=1 + i), Timings())) for i in range(2)]
        await queued(runner, 2)
        with pytest.raises(ResourceExhausted, match="max_queue_size"):
            await runner.infer(texts(2, first_tag=9), Timings())
        forward.release.set()
        await asyncio.gather(running, *waiting)

    drive(scenario, hold=True, max_queue_size=2)


def test_a_deadline_passed_in_the_queue_is_dropped_before_it_runs():
    late = texts(3, first_tag=50)

    async def scenario(runner, forward):
        running = asyncio.create_task(runner.infer(texts(2, first_tag=0), Timings()))
        await started(forward)
        with pytest.raises(DeadlineExceeded):
            await runner.infer(late, Timings(), timeout=0.05)
        assert runner.waiting == 0
        forward.release.set()
        await running
        await runner.infer(texts(2, first_tag=1), Timings())  # the runner goes on
        return forward

    forward = drive(scenario, hold=True)
    assert not forward.ran(late[0])
    with pytest.raises(DeadlineExceeded):
        drive(lambda runner, _: runner.infer(texts(1), Timings(), timeout=0.0))


def test_a_cancelled_request_frees_its_place_and_never_runs():
    gone = texts(4, first_tag=60)

    async def scenario(runner, forward):
        running = asyncio.create_task(runner.infer(texts(2, first_tag=0), Timings()))
        await started(forward)
        call = asyncio.create_task(runner.infer(gone, Timings()))
        await queued(runner, 1)
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
        assert runner.waiting == 0
        forward.release.set()
        await running
        return forward

    assert not drive(scenario, hold=True).ran(gone[0])


def test_unmerged_runner_keeps_requests_apart():
    async def scenario(runner, forward):
        runner.merge_requests = False
        blocker = asyncio.create_task(runner.infer(texts(2, first_tag=0), Timings()))
        await started(forward)
        calls = [asyncio.create_task(runner.infer(texts(3, 3, first_tag=10 * i), Timings())) for i in (1, 2, 3)]
        await queued(runner, 3)
        forward.release.set()
        await asyncio.gather(blocker, *calls)
        return forward.runs

    assert drive(scenario, hold=True)[1:] == [ids_of(texts(3, 3, first_tag=10 * i)) for i in (1, 2, 3)]


def test_a_failed_run_fails_its_requests_only():
    def forward(sequences):
        if any(len(e) == 7 for e in sequences):
            raise RuntimeError("boom")
        return [{"ids": np.array(e.ids)} for e in sequences]

    async def scenario():
        runner = BatchRunner("fake", forward, ModelSettings())
        with pytest.raises(RuntimeError, match="boom"):
            await runner.infer(texts(7), Timings())
        rows = await runner.infer(texts(2), Timings())
        assert runner.waiting == 0
        await runner.close()
        return rows

    assert len(asyncio.run(scenario())) == 1


def test_batchmate_drift_tells_row_independent_forwards_from_batch_scaled_ones():
    sequences = texts(2, 9, 9)

    def independent(batch):
        return [{"x": np.array(e.ids, dtype=np.float32)} for e in batch]

    def scaled_by_batch(batch):  # like one activation scale over the whole batch tensor
        scale = max(max(e.ids) for e in batch)
        return [{"x": np.array(e.ids, dtype=np.float32) / scale} for e in batch]

    assert batchmate_drift(independent, sequences) == 0.0
    assert batchmate_drift(scaled_by_batch, sequences) > 0.1


# Through gRPC, on a tiny exported encoder.

KIND = "bert-feature-extraction"
TEXTS = CORPUS[:24]


@pytest.fixture(scope="module")
def exported(export):
    return export(KIND, precisions=("fp32",))


@pytest.fixture(scope="module")
def reference(exported, start_server):
    """Each text encoded alone."""
    with start_server({KIND: exported}).client() as client:
        return {text: np.array(client.encode(model=KIND, texts=[text]).results[0]) for text in TEXTS}


def concurrently(call: Callable[[int], object], count: int) -> list:
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(call, range(count)))


def test_concurrent_grpc_calls_are_merged_with_parity(exported, start_server, reference):
    """The model holds its run until 8 sequences wait, so the merge is certain, not timed (no warm-up:
    its lone request would be held as long)."""
    server = start_server({KIND: exported}, max_batch_size=8, max_queue_delay_ms=60_000, warmup=False)
    requests = [TEXTS[0:1], TEXTS[1:3], TEXTS[3:4], TEXTS[4:7], TEXTS[7:8]]  # 8 texts in all

    def call(index: int):
        with server.client() as client:
            return client.encode(model=KIND, texts=requests[index])

    responses = concurrently(call, len(requests))
    for request, response in zip(requests, responses, strict=True):
        assert response.metadata.batch_size == 8
        np.testing.assert_allclose(np.array(response.results), [reference[t] for t in request], atol=1e-5)


def test_grpc_request_over_the_token_budget_is_split_with_parity(exported, start_server, reference):
    server = start_server({KIND: exported}, max_batch_tokens=64)
    with server.client() as client:
        response = client.encode(model=KIND, texts=TEXTS)
        shortest = min(len(e.input_ids) for e in client.tokenize(model=KIND, texts=TEXTS))
    assert 1 <= response.metadata.batch_size <= 64 // shortest < len(TEXTS)
    np.testing.assert_allclose(np.array(response.results), [reference[t] for t in TEXTS], atol=1e-5)


def test_grpc_full_queue_is_resource_exhausted_and_late_calls_deadline_exceeded(exported, start_server):
    """One call waits for a batchmate that cannot come (the queue holds one request): the next is
    refused at once, and the waiting one's deadline passes in the queue."""
    server = start_server({KIND: exported}, max_batch_size=2, max_queue_size=1, max_queue_delay_ms=60_000, warmup=False)
    runner = server.server.registry.get(KIND).pipeline.runner
    with ThreadPoolExecutor(1) as pool, server.client(timeout=2) as client:
        waiting = pool.submit(client.encode, model=KIND, texts=[TEXTS[0]])
        while runner.waiting < 1:
            assert not waiting.done(), waiting.exception()
            time.sleep(0.001)
        with pytest.raises(grpc.RpcError) as refused:
            client.encode(model=KIND, texts=[TEXTS[1]])
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as late:
            waiting.result()
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_generation_busy_on_every_thread_does_not_stall_encoders(exported, export, start_server, monkeypatch):
    """Generation steps are held open on every generation thread, with more generations waiting
    (as a long prefill or many streams keep them busy): Encode on another model still answers."""
    from onnxserve.server.tasks.generation import drivers as generation

    entered, release = threading.Semaphore(0), threading.Event()
    step = generation.SoloGeneration.step

    def held_step(self) -> bool:
        entered.release()
        release.wait(60)
        return step(self)

    monkeypatch.setattr(generation.SoloGeneration, "step", held_step)
    server = start_server({KIND: exported, "gpt2": export("gpt2-causal-lm", precisions=("fp32",))})
    threads = server.server.generation_executor._max_workers
    with ThreadPoolExecutor(threads + 2) as pool, server.client(timeout=60) as client:
        calls = [
            pool.submit(client.generate, model="gpt2", prompts=["Hello"], max_new_tokens=2) for _ in range(threads + 2)
        ]
        try:
            for _ in range(threads):
                assert entered.acquire(timeout=60), "the generations never started"
            with server.client(timeout=20) as encoder_client:
                assert encoder_client.encode(model=KIND, texts=[TEXTS[0]]).metadata.batch_size == 1
        finally:
            release.set()
        assert all(call.result().results for call in calls)


def test_the_token_budget_bounds_a_runs_pixels() -> None:
    """An image counts its 16 x 16 pixel patches: 224 x 224 is 196, so 32 of them fit one run of the
    default budget, while DETR-sized images (800 x 1066, 3331 each) run four at a time."""
    small, large = PixelValues(np.zeros((3, 224, 224), np.float32)), PixelValues(np.zeros((3, 800, 1066), np.float32))
    assert (len(small), len(large)) == (196, 3331)
    assert [len(run) for run in plan_runs([len(small)] * 40, 32, 16384)] == [32, 8]
    assert [len(run) for run in plan_runs([len(large)] * 5, 32, 16384)] == [4, 1]
