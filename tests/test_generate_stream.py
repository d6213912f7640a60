"""GenerateStream: pieces that join into exactly the unary text (ASCII, CJK, emoji), a last
message with the finish reason and metadata, and a decoding loop that stops within a step of the
client's cancel or deadline, counted on the server side."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from onnxserve.server.tasks.generation.streaming import IncrementalDecoder
from tokenizers import Tokenizer

from tests.generation_reference import PROMPTS

# Byte-level BPE (emoji and CJK split across tokens), Llama's metaspace BPE, T5's unigram.
KINDS = ["gpt2-causal-lm", "llama-causal-lm", "t5-seq2seq"]
ENCODER = "bert-feature-extraction"
TEXTS = [
    "plain ASCII, with spaces  and punctuation!",
    "我喜欢北京的博物馆。",
    "Rockets 🚀 and smiles 🙂🙂",
    "Zoë 🙂 你好 ok",
]
SLOW_STEP_S = 0.05


@pytest.fixture(scope="module")
def exported(export):
    return {kind: export(kind, precisions=("fp32",)) for kind in [*KINDS, ENCODER]}


@pytest.fixture(scope="module")
def server(exported, start_server):
    return start_server(exported, precision="fp32")


@pytest.fixture
def client(server):
    with server.client() as client:
        yield client


@pytest.mark.parametrize("kind", KINDS)
def test_incremental_decoding_never_cuts_or_repeats(exported, kind):
    tokenizer = Tokenizer.from_file(str(exported[kind].model_dir / "1" / "tokenizer.json"))
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        decoder = IncrementalDecoder(tokenizer)
        pieces = [decoder.push(token) for token in ids] + [decoder.flush()]
        assert "".join(pieces) == tokenizer.decode(ids)
        assert not any("\ufffd" in piece for piece in pieces)


def stream(client, kind: str, prompt: str, **settings) -> list:
    return list(client.generate_stream(model=kind, prompt=prompt, **settings))


@pytest.mark.parametrize("kind", KINDS)
def test_pieces_join_into_the_unary_text(client, kind):
    seen = ""
    for prompt in PROMPTS:
        for settings in ({}, {"do_sample": True, "seed": 4, "temperature": 1.5}, {"stop": ["e", "的"]}):
            unary = client.generate(model=kind, prompts=[prompt], max_new_tokens=24, **settings)[0]
            chunks = stream(client, kind, prompt, max_new_tokens=24, **settings)
            assert "".join(chunk.text for chunk in chunks) == unary.generated_text
            assert [t for chunk in chunks for t in chunk.token_ids] == unary.token_ids
            assert chunks[-1].generated_text == unary.generated_text
            assert chunks[-1].finish_reason == unary.finish_reason
            assert all(chunk.finish_reason is None for chunk in chunks[:-1])
            assert all(chunk.text for chunk in chunks[:-1])
            seen += unary.generated_text
    # The outputs cover what the test is about: more than ASCII.
    assert any("\u4e00" <= char <= "\u9fff" for char in seen), seen


def test_byte_level_output_covers_emoji(client):
    """GPT-2's byte-level pieces split an emoji over several tokens; some sampled output has one."""
    for seed in range(40):
        unary = client.generate(
            model="gpt2-causal-lm", prompts=["Rockets 🚀"], max_new_tokens=24, do_sample=True, seed=seed
        )
        if any(ord(char) > 0xFFFF for char in unary[0].generated_text):
            chunks = stream(client, "gpt2-causal-lm", "Rockets 🚀", max_new_tokens=24, do_sample=True, seed=seed)
            assert "".join(chunk.text for chunk in chunks) == unary[0].generated_text
            return
    pytest.fail("no sampled output held an emoji")


def test_last_message_carries_metadata_and_full_text(client):
    chunks = stream(client, "gpt2-causal-lm", PROMPTS[0], max_new_tokens=8, return_full_text=True)
    assert chunks[0].text.startswith(PROMPTS[0])
    last = chunks[-1]
    assert last.generated_text == "".join(chunk.text for chunk in chunks)
    assert last.metadata.model == "gpt2-causal-lm"
    assert last.metadata.tokens > 0 and last.metadata.inference_ns > 0
    assert all(chunk.metadata is None for chunk in chunks[:-1])


def test_beam_search_streams_its_result_at_the_end(client):
    unary = client.generate(model="t5-seq2seq", prompts=[PROMPTS[2]], max_new_tokens=12, num_beams=3)[0]
    chunks = stream(client, "t5-seq2seq", PROMPTS[2], max_new_tokens=12, num_beams=3)
    assert "".join(chunk.text for chunk in chunks) == unary.generated_text


@pytest.fixture
def slow_steps(server, monkeypatch):
    """Slows every decoder run of gpt2 down, and gives its pipeline's step counters."""
    pipeline = server.server.registry.get("gpt2-causal-lm").pipeline
    session = pipeline.sessions["model"]
    run = session.run

    def slow_run(feeds):
        time.sleep(SLOW_STEP_S)
        return run(feeds)

    monkeypatch.setattr(session, "run", slow_run)
    return pipeline.stats


def wait_until_released(stats, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while stats.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stats.active == 0, "the generation still holds its cache"


def assert_loop_stopped(stats, started_at: int, bound: int) -> None:
    wait_until_released(stats)
    stopped_at = stats.steps
    time.sleep(5 * SLOW_STEP_S)
    assert stats.steps == stopped_at, "decoding went on after the call ended"
    assert stopped_at - started_at <= bound


def test_cancelling_the_stream_stops_the_loop(client, slow_steps):
    before = slow_steps.steps
    chunks = client.generate_stream(model="gpt2-causal-lm", prompt=PROMPTS[0], max_new_tokens=200)
    for received, _ in enumerate(chunks, start=1):
        if received == 3:
            break
    chunks.close()  # cancels the call
    # Three messages took at most a few steps (a piece may wait for a character's next byte);
    # the server may have run one more step while the cancel travelled.
    assert_loop_stopped(slow_steps, before, bound=12)


def test_a_passed_deadline_stops_the_loop(server, slow_steps):
    before = slow_steps.steps
    with server.client(timeout=0.5) as client, pytest.raises(grpc.RpcError) as raised:
        list(client.generate_stream(model="gpt2-causal-lm", prompt=PROMPTS[0], max_new_tokens=200))
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with server.client(timeout=0.5) as client, pytest.raises(grpc.RpcError) as raised:
        client.generate(model="gpt2-causal-lm", prompts=PROMPTS, max_new_tokens=200)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # 2 x 0.5 s at SLOW_STEP_S a step is about 20 steps; 200 would mean the loop ran on.
    assert_loop_stopped(slow_steps, before, bound=40)


def test_other_models_are_served_while_a_generation_runs(server, client, slow_steps):
    generating = threading.Thread(
        target=lambda: client.generate(model="gpt2-causal-lm", prompts=PROMPTS, max_new_tokens=40)
    )
    generating.start()
    time.sleep(5 * SLOW_STEP_S)
    with server.client() as other:
        started = time.monotonic()
        other.encode(model=ENCODER, texts=["still served"])
        waited = time.monotonic() - started
    assert generating.is_alive(), "the generation ended before the check"
    generating.join()
    assert waited < 20 * SLOW_STEP_S  # the generation takes 40 steps: Encode did not wait for it
