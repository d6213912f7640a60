"""Continuous batching for Whisper: concurrent Transcribe and TranscribeStream calls share the
decode steps of the fused Whisper decoder (export/whisper_graph.py), each row over its own audio,
and each call still gets exactly what it gets alone, which for greedy decoding is transformers'
generate(). The tiny Whisper of test_transcribe_whisper, exported by the real exporter.

Every decoder run is slowed down a little (the tiny model decodes a token in about a
millisecond), so that the staggered calls surely overlap."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
import torch
from onnx import load_model
from onnxserve.export.whisper_gate import judge_whisper_graphs
from onnxserve.export.whisper_graph import build_whisper_graphs
from onnxserve.server.runtime.sessions import Session, SessionSettings
from onnxserve.server.tasks.generation.cross import CrossGraph
from transformers import WhisperForConditionalGeneration

from onnxserve.v1 import inference_pb2, inference_pb2_grpc
from tests.speech import speech_like
from tests.test_continuous_batching import concurrently, wait_until_idle
from tests.test_transcribe_whisper import (
    CLIPS,
    LANGUAGE_CODES,
    MODEL,
    NEW_TOKENS,
    build_whisper,
    features_of,
    generate_ids,
    raw,
    reference_model,
)

SLOW_RUN_S = 0.01
SEGMENTS = inference_pb2.TIMESTAMPS_SEGMENT
# (rpc, audio, fields): languages given and detected, timestamps, seeded sampling, a 37 s clip
# (two windows: two rows), different lengths, so that rows join and leave at different steps.
CALLS = [
    ("unary", "short", {"language": "en"}),
    ("stream", "long", {"language": "en", "return_timestamps": SEGMENTS}),
    ("unary", "window", {"language": "german"}),
    ("unary", "other", {"language": ""}),
    ("stream", "window", {"language": "fr", "return_timestamps": SEGMENTS}),
    ("unary", "short", {"language": "en", "parameters": {"do_sample": True, "seed": 5, "temperature": 1.3}}),
    ("unary", "long", {"language": "de", "task": "translate"}),
    ("unary", "other", {"language": "en", "parameters": {"max_new_tokens": 9}}),
]
AUDIO = {**CLIPS, "other": speech_like(7.0, 4)}
# The greedy calls of one window (indices in CALLS), whose ids are checked against generate().
GREEDY = (0, 2, 3)


@pytest.fixture(scope="module")
def whisper_checkpoint(tmp_path_factory):
    return build_whisper(tmp_path_factory.mktemp("whisper"))


@pytest.fixture(scope="module")
def server(export, whisper_checkpoint, start_server):
    exported = export(MODEL, precisions=("fp32",), source=whisper_checkpoint)
    running = start_server({MODEL: exported}, precision="fp32", intra_op_threads=1)
    pipeline = running.server.registry.get(MODEL).pipeline
    session = pipeline.sessions["fused_decoder"].session
    run = session.run_with_iobinding

    def slow_run(binding, *args):
        time.sleep(SLOW_RUN_S)
        return run(binding, *args)

    session.run_with_iobinding = slow_run
    return running, pipeline


def call(stub, rpc: str, audio: str, fields: dict) -> object:
    """What a caller sees: the transcription, or every stream message."""
    fields = dict(fields)
    parameters = inference_pb2.GenerationParameters(**{"max_new_tokens": NEW_TOKENS, **fields.pop("parameters", {})})
    if rpc == "stream":
        request = inference_pb2.TranscribeStreamRequest(
            model=MODEL, audio=raw(AUDIO[audio]), parameters=parameters, **fields
        )
        return [(m.chunk, m.transcription) for m in stub.TranscribeStream(request, timeout=120)]
    request = inference_pb2.TranscribeRequest(model=MODEL, audios=[raw(AUDIO[audio])], parameters=parameters, **fields)
    (result,) = stub.Transcribe(request, timeout=120).results
    return result


def test_the_export_carries_the_fused_decoder(server):
    _, pipeline = server
    assert pipeline.scheduler is not None
    assert {"fused_decoder", "cross_attention", "decoder", "encoder"} <= pipeline.sessions.keys()


def test_staggered_calls_share_steps_and_each_equal_their_solo_result(server, whisper_checkpoint):
    running, pipeline = server
    stats = pipeline.stats
    with grpc.insecure_channel(running.target) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        solo, solo_steps = [], 0
        for rpc, audio, fields in CALLS:
            before = stats.steps
            solo.append(call(stub, rpc, audio, fields))
            solo_steps += stats.steps - before
        wait_until_idle(stats)
        steps, runs = stats.steps, stats.runs
        together = concurrently([lambda c=c: call(stub, *c) for c in CALLS])
        wait_until_idle(stats)
    assert together == solo
    # Every call took the steps it takes alone, in fewer decoder runs: they shared them.
    assert stats.steps - steps == solo_steps
    assert stats.runs - runs < solo_steps
    for index in GREEDY:
        _, audio, fields = CALLS[index]
        features = features_of(whisper_checkpoint, AUDIO[audio])
        expected = generate_ids(whisper_checkpoint, features, LANGUAGE_CODES[fields["language"]])
        assert list(solo[index].token_ids) == expected, CALLS[index]
        assert len(set(expected)) > 3
    assert len(solo[1]) > 2 and solo[1][-1][1].text  # the long stream sent segments, then its transcription


def test_the_graph_decodes_rows_of_different_lengths_as_alone(whisper_checkpoint, tmp_path):
    """The graph alone, as the scheduler drives it: two rows over different audio, the second
    joining three steps after the first, with a spare third row the first decodes beside."""
    model = reference_model(whisper_checkpoint)
    build_whisper_graphs(model, tmp_path / "decoder.onnx", tmp_path / "cross.onnx")
    assert any(node.op_type == "GroupQueryAttention" for node in load_model(tmp_path / "decoder.onnx").graph.node)
    sessions = [Session(tmp_path / name, SessionSettings()) for name in ("decoder.onnx", "cross.onnx")]
    graph = CrossGraph(*sessions)
    config = model.generation_config
    prompt = [config.decoder_start_token_id, config.lang_to_id["<|en|>"], config.task_to_id["transcribe"]]
    prompt.append(config.no_timestamps_token_id)
    with torch.inference_mode():
        states = [
            model.model.encoder(features_of(whisper_checkpoint, AUDIO[audio])).last_hidden_state.numpy()
            for audio in ("short", "window")
        ]

    def greedy_alone(hidden: np.ndarray) -> list[int]:
        batch = graph.batch(rows=1, length=len(prompt) + NEW_TOKENS)
        tokens = [int(batch.prefill(0, [prompt], hidden).argmax(axis=-1)[0])]
        while len(tokens) < NEW_TOKENS:
            tokens.append(int(batch.decode(np.array(tokens[-1:])).argmax(axis=-1)[0]))
        return tokens

    alone = [greedy_alone(hidden) for hidden in states]
    batch = graph.batch(rows=2, length=len(prompt) + NEW_TOKENS)
    first = [int(batch.prefill(0, [prompt], states[0]).argmax(axis=-1)[0])]
    for _ in range(3):
        first.append(int(batch.decode(np.array(first[-1:])).argmax(axis=-1)[0]))
    second = [int(batch.prefill(1, [prompt], states[1]).argmax(axis=-1)[0])]
    while len(second) < NEW_TOKENS - 3:
        logits = batch.decode(np.array([first[-1], second[-1]])).argmax(axis=-1)
        first.append(int(logits[0]))
        second.append(int(logits[1]))
    assert first == alone[0][: len(first)]
    assert second == alone[1][: len(second)]
    assert alone[0] != alone[1]


def test_the_export_gate_judges_the_fused_graphs(whisper_checkpoint, tmp_path):
    """The gate passes the checkpoint's own graphs and refuses graphs whose positions are off."""
    model = reference_model(whisper_checkpoint)
    graphs = {"fused_decoder": tmp_path / "decoder.onnx", "cross_attention": tmp_path / "cross.onnx"}
    build_whisper_graphs(model, graphs["fused_decoder"], graphs["cross_attention"])
    validation = judge_whisper_graphs(model, graphs, "fp32")
    assert validation.passed, list(validation.failures)
    assert validation.top1_agreement == 1.0
    shifted = WhisperForConditionalGeneration.from_pretrained(whisper_checkpoint).eval()
    with torch.no_grad():  # every token one position late
        shifted.model.decoder.embed_positions.weight[1:] = model.model.decoder.embed_positions.weight[:-1].clone()
    build_whisper_graphs(shifted, graphs["fused_decoder"], graphs["cross_attention"])
    assert not judge_whisper_graphs(model, graphs, "fp32").passed
