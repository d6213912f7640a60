"""Transcribe and TranscribeStream on CTC models at parity with
transformers.pipeline("automatic-speech-recognition") on the same tiny random checkpoints
(Wav2Vec2ForCTC, HubertForCTC), built here with a vocabulary made in the test: text identical,
character and word offsets identical, a 37 s clip chunked with stride as the pipeline chunks it;
encoded files and raw samples; and the bad inputs refused with INVALID_ARGUMENT naming the
problem, after which the server goes on."""

from __future__ import annotations

import asyncio
import io
import json
from functools import cache
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile
import torch
from onnxserve.client import AsyncClient
from transformers import (
    HubertConfig,
    HubertForCTC,
    Wav2Vec2Config,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
    Wav2Vec2Processor,
    pipeline,
)

from onnxserve.kserve_v2 import grpc_predict_v2_pb2_grpc as v2_grpc
from onnxserve.v1 import inference_pb2, inference_pb2_grpc
from tests.node_tools import run_node
from tests.speech import RATE, TINY_ENCODER, audio_request, encoded, speech_like
from tests.test_kserve import output

KINDS = ["wav2vec2-ctc", "hubert-ctc"]
# Blank, specials, the word delimiter, letters and an apostrophe, as wav2vec2's English vocabularies.
VOCABULARY = ["<pad>", "<s>", "</s>", "<unk>", "|", *"ETAONISHRDLUCMWFGYPBVKXJQZ'"]
# Timestamps travel as float32 (TranscriptionChunk.start and end): within its rounding of the pipeline's.
TIME_TOLERANCE = {"rel": 1e-7, "abs": 1e-7}


def _encoder_sizes() -> dict:
    return {**TINY_ENCODER, "vocab_size": len(VOCABULARY), "pad_token_id": VOCABULARY.index("<pad>")}


BUILDERS = {
    "wav2vec2-ctc": lambda: Wav2Vec2ForCTC(Wav2Vec2Config(**_encoder_sizes())),
    "hubert-ctc": lambda: HubertForCTC(HubertConfig(**_encoder_sizes())),
}


def build(kind: str, directory: Path) -> Path:
    torch.manual_seed(0)
    model = BUILDERS[kind]().eval()
    with torch.no_grad():  # spread the logits, so that frames pick varied characters, blanks and spaces
        model.lm_head.weight.uniform_(-3, 3)
        model.lm_head.bias[[VOCABULARY.index("<pad>"), VOCABULARY.index("|")]] += 10
    model.save_pretrained(directory)
    vocab_file = directory / "vocab.json"
    vocab_file.write_text(json.dumps({token: i for i, token in enumerate(VOCABULARY)}))
    tokenizer = Wav2Vec2CTCTokenizer(str(vocab_file))
    extractor = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=kind == "hubert-ctc")
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def exported(tmp_path_factory, export):
    return {kind: export(kind, source=build(kind, tmp_path_factory.mktemp(kind))) for kind in KINDS}


@cache
def reference(checkpoint: Path):
    return pipeline("automatic-speech-recognition", model=str(checkpoint), device="cpu")


CLIPS = [speech_like(seconds, seed) for seed, seconds in enumerate((0.7, 1.9, 3.1, 4.4))]
LONG_CLIP = speech_like(37.0, seed=9)


def assert_same_chunks(served, expected: list[dict]) -> None:
    assert [c.text for c in served.chunks] == [c["text"] for c in expected]
    for chunk, want in zip(served.chunks, expected, strict=True):
        assert chunk.timestamp == pytest.approx(want["timestamp"], **TIME_TOLERANCE)


@pytest.mark.parametrize("kind", KINDS)
def test_text_matches_the_pipeline(client, exported, kind):
    response = client.transcribe(kind, CLIPS, sample_rate=RATE)
    expected = [reference(exported[kind].checkpoint)(clip.copy())["text"] for clip in CLIPS]
    assert [t.text for t in response] == expected
    assert any(" " in text for text in expected) and len(set(expected)) == len(expected)  # words, varied
    assert response.metadata.model == kind and all(t.chunks == [] for t in response)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("timestamps", ["char", "word"])
def test_offsets_match_the_pipeline(client, exported, kind, timestamps):
    response = client.transcribe(kind, CLIPS, sample_rate=RATE, return_timestamps=timestamps)
    for served, clip in zip(response, CLIPS, strict=True):
        expected = reference(exported[kind].checkpoint)(clip.copy(), return_timestamps=timestamps)
        assert served.text == expected["text"]
        assert_same_chunks(served, expected["chunks"])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("chunk_length_s", "stride_length_s"), [(10.0, 0.0), (6.0, 1.5)])
def test_long_audio_is_chunked_as_the_pipeline_chunks_it(client, exported, kind, chunk_length_s, stride_length_s):
    """37 s in chunks of 10 s with the default stride (10 / 6 s) and of 6 s with 1.5 s."""
    stride = stride_length_s or None
    expected = reference(exported[kind].checkpoint)(
        LONG_CLIP.copy(), chunk_length_s=chunk_length_s, stride_length_s=stride, return_timestamps="word"
    )
    (served,) = client.transcribe(
        kind, [(LONG_CLIP, RATE)], return_timestamps="word", chunk_length_s=chunk_length_s,
        stride_length_s=stride_length_s,
    )  # fmt: skip
    assert served.text == expected["text"]
    assert_same_chunks(served, expected["chunks"])
    unchunked = reference(exported[kind].checkpoint)(LONG_CLIP.copy())["text"]
    assert served.text != unchunked  # the chunking did change the decoding: it is exercised


@pytest.mark.parametrize("kind", KINDS)
def test_encoded_files_match_the_pipeline_on_their_samples(client, exported, kind):
    """WAV and FLAC files, mono and stereo: the pipeline gets the samples libsndfile decodes
    (averaged over channels), the server the files."""
    stereo = np.stack([CLIPS[2], CLIPS[1][: len(CLIPS[1])].repeat(3)[: len(CLIPS[2])]], axis=1)
    files = [encoded(CLIPS[1], subtype="PCM_16"), encoded(stereo, subtype="FLOAT"), encoded(CLIPS[3], format="FLAC")]
    response = client.transcribe(kind, files)
    for served, data in zip(response, files, strict=True):
        samples, _ = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        assert served.text == reference(exported[kind].checkpoint)(samples.mean(axis=1))["text"]


@pytest.mark.parametrize("kind", KINDS)
def test_stream_sends_each_chunk_then_the_transcription(client, exported, kind):
    pieces = list(
        client.transcribe_stream(kind, (LONG_CLIP, RATE), return_timestamps="word", chunk_length_s=10.0)
    )
    (whole,) = client.transcribe(kind, [(LONG_CLIP, RATE)], return_timestamps="word", chunk_length_s=10.0)
    # 10 s chunks (160000 samples) every 10 - 2 x 10 / 6 s (strides rounded to 320-sample frames)
    step = 160000 - 2 * 26560
    chunks = next(i + 1 for i, start in enumerate(range(0, len(LONG_CLIP), step)) if start + 160000 >= len(LONG_CLIP))
    assert chunks == 6 and len(pieces) == chunks + 1
    assert all(p.transcription is None and p.metadata is None for p in pieces[:-1])
    assert pieces[-1].transcription == whole and pieces[-1].metadata.model == kind
    ends = [p.chunk.timestamp[1] for p in pieces[:-1]]
    starts = [p.chunk.timestamp[0] for p in pieces[:-1]]
    # contiguous, to the end of the audio within a frame (20 ms: the feature encoder rounds down)
    assert starts[0] == 0 and starts[1:] == pytest.approx(ends[:-1]) and ends[-1] == pytest.approx(37.0, abs=0.021)
    # each chunk's own text is its kept frames decoded alone: the whole text, cut at chunk borders
    assert " ".join(p.chunk.text for p in pieces[:-1]).split() != [] and all(p.chunk.text for p in pieces[:-1])


def character_error_rate(reference: str, hypothesis: str) -> float:
    """Levenshtein distance over characters, per reference character."""
    previous = list(range(len(hypothesis) + 1))
    for i, char in enumerate(reference, 1):
        current = [i]
        for j, other in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char != other)))
        previous = current
    return previous[-1] / max(len(reference), 1)


def test_int8_transcribes_as_fp32_within_its_gate(exported, int8_server, client):
    """The int8 variant passed its export gate (top-1 agreement per logit frame against PyTorch);
    served, its texts stay within a few percent of fp32's characters."""
    kind = KINDS[0]
    fp32 = client.transcribe(kind, CLIPS, sample_rate=RATE)
    with int8_server.client() as int8_client:
        int8 = int8_client.transcribe(kind, CLIPS, sample_rate=RATE)
    assert int8.metadata.precision == "int8"
    rates = [character_error_rate(a.text, b.text) for a, b in zip(fp32, int8, strict=True)]
    assert max(rates) <= 0.1, rates


def _raw(samples: bytes, rate: int = RATE, channels: int = 1) -> inference_pb2.Audio:
    return inference_pb2.Audio(raw=inference_pb2.RawAudio(samples=samples, sample_rate=rate, channels=channels))


BAD_REQUESTS = {
    "no audios": ({"audios": []}, "holds no audios"),
    "not audio": ({"audios": [inference_pb2.Audio(data=b"GIF89a" + bytes(64))]}, "audio 0 (70 bytes) cannot be"),
    "truncated wav": (
        {"audios": [inference_pb2.Audio(data=encoded(CLIPS[1], subtype="PCM_16")[:9000])]}, "audio 0 is truncated",
    ),
    "nan": ({"audios": [_raw(np.array([0, np.nan], "<f4").tobytes())]}, "NaN or infinite sample"),
    "rate": ({"audios": [_raw(CLIPS[0].tobytes(), rate=400_000)]}, "400000 Hz is outside 1 to 384000 Hz"),
    "ragged": ({"audios": [_raw(bytes(6))]}, "not a multiple of 4 x channels"),
    "empty second audio": ({"audios": [_raw(CLIPS[0].tobytes()), _raw(b"")]}, "audio 1 has no samples"),
    "segments": (
        {"return_timestamps": inference_pb2.TIMESTAMPS_SEGMENT}, "CTC models give character or word timestamps",
    ),
    "language": ({"language": "en"}, "it takes no language or task"),
    "generation": ({"parameters": inference_pb2.GenerationParameters(num_beams=2)}, "no generation parameters"),
    "stride over chunk": ({"chunk_length_s": 3, "stride_length_s": 1.5}, "must be longer than twice stride_length_s"),
    "stride alone": ({"stride_length_s": 1}, "stride_length_s needs chunk_length_s"),
    "negative chunk": ({"chunk_length_s": -1}, "chunk_length_s must be a finite number"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_are_refused_naming_the_problem(client, exported, case):
    fields, message = BAD_REQUESTS[case]
    request = inference_pb2.TranscribeRequest(model=KINDS[0], **({"audios": [_raw(CLIPS[0].tobytes())]} | fields))
    with pytest.raises(grpc.RpcError) as refused:
        client.inference.Transcribe(request, timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in refused.value.details()
    assert client.transcribe(KINDS[0], [CLIPS[0]], sample_rate=RATE)[0].text  # the server goes on


def test_too_long_audio_is_refused(start_server, exported):
    server = start_server({KINDS[0]: exported[KINDS[0]]}, precision="fp32", max_audio_seconds=2.0)
    with server.client() as client, pytest.raises(grpc.RpcError) as refused:
        client.transcribe(KINDS[0], [CLIPS[3]], sample_rate=RATE)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "lasts 4.4 s, over the limit of 2 s (max_audio_seconds)" in refused.value.details()


def test_a_ctc_model_refuses_other_rpcs_naming_its_own(client, exported):
    with pytest.raises(grpc.RpcError) as refused:
        client.classify_audio(KINDS[0], [CLIPS[0]], sample_rate=RATE)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "serves Transcribe, TranscribeStream" in refused.value.details()


def test_the_command_transcribes_audio_files(fp32_server, tmp_path, capsys):
    from onnxserve.cli import main

    files = [tmp_path / "one.wav", tmp_path / "two.wav"]
    for path, clip in zip(files, CLIPS[:2], strict=True):
        path.write_bytes(encoded(clip, subtype="FLOAT"))
    command = ["transcribe", "--model", KINDS[0], "--target", fp32_server.target, "--json"]
    main([*command, *map(str, files)])
    printed = json.loads(capsys.readouterr().out)
    with fp32_server.client() as client:
        expected = client.transcribe(KINDS[0], [path.read_bytes() for path in files], return_timestamps="word")
    assert [r["text"] for r in printed["results"]] == [t.text for t in expected]
    main([*command, "--timestamps", "word", str(files[0])])
    (words,) = json.loads(capsys.readouterr().out)["results"]
    assert [(c["text"], tuple(c["timestamp"])) for c in words["chunks"]] == [
        (c.text, c.timestamp) for c in expected[0].chunks
    ]


def test_kserve_audio_transcribes_like_transcribe(fp32_server, client):
    files = [encoded(clip, subtype="FLOAT") for clip in CLIPS[:3]]
    typed = client.transcribe(KINDS[0], files, return_timestamps="word", chunk_length_s=2.0)
    with grpc.insecure_channel(fp32_server.target) as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(audio_request(KINDS[0], files, return_timestamps="word", chunk_length_s="2"))
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(audio_request(KINDS[0], [b"not audio"]))
    assert output(response, "text").tolist() == [t.text for t in typed]
    words = output(response, "chunk_text")
    assert [[w for w in row if w] for row in words.tolist()] == [[c.text for c in t.chunks] for t in typed]
    starts = [row[: len(t.chunks)] for row, t in zip(output(response, "start"), typed, strict=True)]
    assert [list(row) for row in starts] == [[c.timestamp[0] for c in t.chunks] for t in typed]
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cannot be decoded" in refused.value.details()


def test_the_node_client_transcribes(fp32_server, tmp_path):
    """transcribe with word timestamps and transcribeStream from Node, against the Python client."""
    path = tmp_path / "clip.wav"
    path.write_bytes(encoded(CLIPS[2], subtype="FLOAT"))
    script = """
const { OnnxServeClient } = require(".");
const [target, model, file] = process.argv.slice(1);
const client = new OnnxServeClient(target, { timeoutMs: 60000 });
const audio = { data: require("fs").readFileSync(file) };
(async () => {
  const whole = await client.transcribe({ model, audios: [audio], returnTimestamps: "TIMESTAMPS_WORD" });
  const pieces = [];
  for await (const piece of client.transcribeStream({ model, audio, chunkLengthS: 1 })) pieces.push(piece);
  process.stdout.write(JSON.stringify({ whole: whole.results[0], last: pieces[pieces.length - 1].transcription,
                                        count: pieces.length }));
})().finally(() => client.close());
"""
    got = json.loads(run_node(script, fp32_server.target, KINDS[0], str(path)))
    with fp32_server.client() as client:
        (words,) = client.transcribe(KINDS[0], [path], return_timestamps="word")
        streamed = list(client.transcribe_stream(KINDS[0], path, chunk_length_s=1.0))
    assert got["whole"]["text"] == words.text
    assert [(c["text"], c["start"], c["end"]) for c in got["whole"]["chunks"]] == [
        (c.text, *c.timestamp) for c in words.chunks
    ]
    assert got["count"] == len(streamed) > 2 and got["last"]["text"] == streamed[-1].transcription.text


def test_a_cancelled_stream_leaves_the_server_serving(fp32_server, client):
    request = inference_pb2.TranscribeStreamRequest(
        model=KINDS[0], audio=_raw(LONG_CLIP.tobytes()), chunk_length_s=10.0
    )
    with grpc.insecure_channel(fp32_server.target) as channel:
        call = inference_pb2_grpc.InferenceStub(channel).TranscribeStream(request, timeout=60)
        first = next(call)
        call.cancel()
        with pytest.raises(grpc.RpcError) as cancelled:
            list(call)
    assert first.chunk.text and cancelled.value.code() == grpc.StatusCode.CANCELLED
    assert client.transcribe(KINDS[0], [CLIPS[0]], sample_rate=RATE)[0].text


def test_the_async_client_answers_as_the_blocking_one(fp32_server, client):
    async def calls():
        async with AsyncClient(fp32_server.target, timeout=60) as async_client:
            whole = await async_client.transcribe(KINDS[0], [(CLIPS[1], RATE)], return_timestamps="char")
            pieces = [p async for p in async_client.transcribe_stream(KINDS[0], (LONG_CLIP, RATE), chunk_length_s=10)]
            return whole, pieces

    whole, pieces = asyncio.run(calls())
    assert whole.results == client.transcribe(KINDS[0], [(CLIPS[1], RATE)], return_timestamps="char").results
    streamed = list(client.transcribe_stream(KINDS[0], (LONG_CLIP, RATE), chunk_length_s=10))
    assert [p.chunk for p in pieces] == [p.chunk for p in streamed]
    assert pieces[-1].transcription == streamed[-1].transcription


def test_whisper_and_ctc_models_answer_transcribe_on_one_server(exported, export, start_server, tmp_path_factory):
    """Two registrations serve Transcribe (CTC and speech seq2seq): each model's own answers."""
    from tests.test_transcribe_whisper import MODEL, build_whisper

    whisper = export(MODEL, precisions=("fp32",), source=build_whisper(tmp_path_factory.mktemp("whisper")))
    server = start_server({KINDS[0]: exported[KINDS[0]], MODEL: whisper}, precision="fp32", intra_op_threads=1)
    with server.client() as client:
        (ctc,) = client.transcribe(KINDS[0], [CLIPS[1]], sample_rate=RATE)
        (seq2seq,) = client.transcribe(MODEL, [CLIPS[1]], sample_rate=RATE, max_new_tokens=5)
    assert ctc.text == reference(exported[KINDS[0]].checkpoint)(CLIPS[1].copy())["text"] and not ctc.token_ids
    assert seq2seq.token_ids and seq2seq.language  # Whisper's generated ids and detected language
