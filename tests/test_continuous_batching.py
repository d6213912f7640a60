"""Continuous batching on the fused decoder (which Llama-family exports get): concurrent Generate
and GenerateStream calls share decode steps, and each still gets exactly the output it gets
alone; a cancelled stream frees its row for a waiting request; past the rows and the queue, a
call is refused with RESOURCE_EXHAUSTED.

Every decode run is slowed down a little (the tiny model decodes a token in about a millisecond),
so that the staggered calls surely overlap."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable

import grpc
import pytest

from tests.generation_reference import PROMPTS

MODEL = "llama-causal-lm"
SLOW_RUN_S = 0.01
STAGGER_S = 0.03
# (rpc, prompts, parameters): greedy and seeded sampling, processors, stop strings, requests of
# one and two rows and of different lengths, so rows join and leave at different steps.
CALLS = [
    ("stream", [PROMPTS[0]], {"max_new_tokens": 40}),
    ("generate", PROMPTS[1:3], {"max_new_tokens": 24}),
    ("stream", [PROMPTS[2]], {"max_new_tokens": 32, "do_sample": True, "seed": 3, "temperature": 1.2}),
    ("generate", [PROMPTS[3]], {"max_new_tokens": 12, "repetition_penalty": 1.3}),
    ("stream", [PROMPTS[3]], {"max_new_tokens": 48, "do_sample": True, "seed": 7, "top_k": 20}),
    ("generate", [PROMPTS[0], PROMPTS[2]], {"max_new_tokens": 36, "do_sample": True, "seed": 11}),
    ("stream", [PROMPTS[1]], {"max_new_tokens": 20, "stop": ["e"]}),
    ("generate", [PROMPTS[2]], {"max_new_tokens": 30, "return_full_text": True}),
]


@pytest.fixture(scope="module")
def exported(export):
    return {MODEL: export(MODEL, precisions=("fp32",))}


def slowed(server) -> object:
    """The model's pipeline, its decode runs slowed by SLOW_RUN_S."""
    pipeline = server.server.registry.get(MODEL).pipeline
    session = pipeline.sessions["model"].session
    run = session.run_with_iobinding

    def slow_run(binding, *args):
        time.sleep(SLOW_RUN_S)
        return run(binding, *args)

    session.run_with_iobinding = slow_run
    return pipeline


@pytest.fixture(scope="module")
def pipeline(exported, start_server):
    server = start_server(exported, precision="fp32", intra_op_threads=1)
    return server, slowed(server)


def call(client, rpc: str, prompts: list[str], parameters: dict) -> list:
    """What a caller sees: every stream message, or every result."""
    if rpc == "stream":
        return [
            (chunk.text, chunk.token_ids, chunk.finish_reason, chunk.generated_text)
            for chunk in client.generate_stream(model=MODEL, prompt=prompts[0], **parameters)
        ]
    results = client.generate(model=MODEL, prompts=prompts, **parameters)
    return [(result.generated_text, result.token_ids, result.finish_reason) for result in results]


def concurrently(calls: list[Callable[[], object]]) -> list:
    """Runs the calls from their own threads, the i-th started i * STAGGER_S after the first."""
    results: list = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(index: int) -> None:
        start.wait()
        time.sleep(index * STAGGER_S)
        results[index] = calls[index]()

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def wait_until_idle(stats, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while stats.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stats.active == 0, "a generation still holds rows"


def test_staggered_calls_share_steps_and_each_equal_their_solo_output(pipeline):
    server, generation = pipeline
    stats = generation.stats
    with server.client() as client:
        solo, solo_steps = [], 0
        for rpc, prompts, parameters in CALLS:
            before = stats.steps
            solo.append(call(client, rpc, prompts, parameters))
            solo_steps += stats.steps - before
        wait_until_idle(stats)
        steps, runs = stats.steps, stats.runs

        def cancelled_stream() -> int:
            chunks = client.generate_stream(model=MODEL, prompt=PROMPTS[2], max_new_tokens=200)
            received = len(list(itertools.islice(chunks, 3)))
            chunks.close()  # cancels the call
            return received

        calls = [lambda c=c: call(client, *c) for c in CALLS]
        together = concurrently([cancelled_stream, *calls])
        wait_until_idle(stats)
    assert together[0] == 3
    assert together[1:] == solo
    # Every call took the steps it takes alone (the cancelled one some more), in fewer model runs.
    assert stats.steps - steps >= solo_steps
    assert stats.runs - runs < solo_steps
    assert any(isinstance(message[0], str) and message[0] for message in solo[0])  # streams carried text


@pytest.fixture(scope="module")
def one_row(exported, start_server):
    """One row and room for one waiting request: the limits are easy to reach."""
    server = start_server(exported, precision="fp32", intra_op_threads=1, max_generation_rows=1, max_queue_size=1)
    return server, slowed(server)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert condition(), what


def test_a_cancelled_stream_frees_its_row_and_a_full_queue_refuses(one_row):
    server, generation = one_row
    stats, scheduler = generation.stats, generation.scheduler
    queued_call = ("generate", [PROMPTS[1]], {"max_new_tokens": 8})
    with server.client() as client:
        before = stats.steps
        expected = call(client, *queued_call)
        queued_steps = stats.steps - before
        # Alone, the stream runs all 200 steps: it ends by length.
        assert call(client, "stream", [PROMPTS[0]], {"max_new_tokens": 200})[-1][2] == "length"
        wait_until_idle(stats)
        before = stats.steps
        chunks = client.generate_stream(model=MODEL, prompt=PROMPTS[0], max_new_tokens=200)
        next(chunks)  # the stream holds the only row
        queued: list = []
        thread = threading.Thread(target=lambda: queued.append(call(client, *queued_call)))
        thread.start()
        wait_for(lambda: scheduler.waiting == 1, "the second call did not queue for the row")
        with pytest.raises(grpc.RpcError) as refused:
            call(client, *queued_call)
        chunks.close()  # cancels the call
        thread.join(timeout=60)
        wait_until_idle(stats)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_queue_size" in refused.value.details()
    assert queued == [expected]
    # The queued call got the row long before the stream's 200 steps: the cancel freed it.
    assert stats.steps - before - queued_steps < 200


def test_a_passed_deadline_frees_the_rows(pipeline):
    server, generation = pipeline
    stats = generation.stats
    wait_until_idle(stats)
    before = stats.steps
    # 200 steps take at least 2 s at SLOW_RUN_S a run.
    with server.client(timeout=0.5) as client, pytest.raises(grpc.RpcError) as raised:
        client.generate(model=MODEL, prompts=PROMPTS[:2], max_new_tokens=200)
    wait_until_idle(stats)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert stats.steps - before < 200
