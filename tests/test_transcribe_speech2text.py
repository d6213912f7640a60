"""Transcribe and TranscribeStream on Speech2Text at parity with transformers: a tiny random
Speech2TextForConditionalGeneration built here (its sentencepiece-like tokenizer trained with
`tokenizers`), exported by the real exporter (task detected, fp32 and int8 through their gates)
and served (int8 too); its token ids against `generate()` and its text against the
automatic-speech-recognition pipeline, greedy and with beams, alone and batched, with a target
language (a speech translation checkpoint's forced first token); and what the pipeline does not
do for these models (timestamps, a task, chunking) refused naming why."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from onnxserve.export.errors import ExportError
from onnxserve.export.tasks import check_exportable, detect_task, task_spec
from transformers import (
    GenerationConfig,
    MoonshineConfig,
    PreTrainedTokenizerFast,
    Speech2TextConfig,
    Speech2TextFeatureExtractor,
    Speech2TextForConditionalGeneration,
)

from onnxserve.kserve_v2 import grpc_predict_v2_pb2_grpc as v2_grpc
from onnxserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from tests.checkpoints import SEED, _unigram
from tests.speech import RATE, audio_request, encoded, speech_like
from tests.test_kserve import output

MODEL = "speech2text"
SPECIAL = ["<s>", "<pad>", "</s>", "<unk>"]  # Speech2Text's sentencepiece ids 0-3
LANGUAGES = ["<lang:fr>", "<lang:de>"]  # a multilingual checkpoint's target languages
TARGET_POSITIONS = 256
MAX_LENGTH = 40  # generation_config.json's, the decoder start token included
NEW_TOKENS = 24
CLIPS = {"short": speech_like(4.0, 1), "window": speech_like(12.5, 2), "long": speech_like(37.0, 3)}


def build_speech2text(directory: Path) -> Path:
    """The checkpoint, its tokenizer (transformers has no fast Speech2Text tokenizer class:
    tokenizer_config.json names PreTrainedTokenizerFast, as for Marian) and feature extractor."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_unigram(SPECIAL + LANGUAGES),
        additional_special_tokens=LANGUAGES,
        bos_token="<s>",
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=TARGET_POSITIONS,
    )
    ids = dict(bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2)
    config = Speech2TextConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        conv_channels=32,
        max_source_positions=1500,
        max_target_positions=TARGET_POSITIONS,
        init_std=0.1,
        tie_word_embeddings=False,  # untied, so that a random decoder's greedy tokens vary
        **ids,
    )
    torch.manual_seed(SEED)
    model = Speech2TextForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(**ids, max_length=MAX_LENGTH)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    Speech2TextFeatureExtractor().save_pretrained(directory)
    return directory


def raw(samples: np.ndarray) -> inference_pb2.Audio:
    return inference_pb2.Audio(raw=inference_pb2.RawAudio(samples=samples.tobytes(), sample_rate=RATE, channels=1))


@pytest.fixture(scope="module")
def speech2text_checkpoint(tmp_path_factory) -> Path:
    return build_speech2text(tmp_path_factory.mktemp("speech2text"))


@pytest.fixture(scope="module")
def exported(export, speech2text_checkpoint):
    return export(MODEL, precisions=("fp32", "int8"), source=speech2text_checkpoint)


@pytest.fixture(scope="module")
def server(exported, start_server):
    return start_server({MODEL: exported}, precision="fp32")


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


@cache
def asr_pipeline(checkpoint: Path):
    from transformers import pipeline

    return pipeline("automatic-speech-recognition", model=str(checkpoint), device="cpu")


def generate_ids(checkpoint: Path, samples: np.ndarray, **settings: object) -> list[int]:
    """generate()'s ids after the decoder start token, on the pipeline's features of the audio
    (NEW_TOKENS of them unless `settings` say otherwise)."""
    pipe = asr_pipeline(checkpoint)
    features = pipe.feature_extractor(samples, sampling_rate=RATE, return_tensors="pt")
    settings = {"max_new_tokens": NEW_TOKENS, **settings}
    with torch.inference_mode():
        ids = pipe.model.generate(
            input_features=features.input_features, attention_mask=features.attention_mask, **settings
        )
    return ids[0, 1:].tolist()


def pipeline_text(checkpoint: Path, samples: np.ndarray, **settings: object) -> str:
    """The pipeline's text with the decoding given: its own default for speech (5 beams, where the
    checkpoint sets none) is not the server's (the checkpoint's, else greedy)."""
    settings = {"max_new_tokens": NEW_TOKENS, "num_beams": 1, **settings}
    return asr_pipeline(checkpoint)(samples.copy(), generate_kwargs=settings)["text"]


def transcribe(stub, samples: np.ndarray, **fields: object) -> inference_pb2.Transcription:
    parameters = inference_pb2.GenerationParameters(max_new_tokens=NEW_TOKENS, **fields.pop("parameters", {}))
    request = inference_pb2.TranscribeRequest(model=MODEL, audios=[raw(samples)], parameters=parameters, **fields)
    (result,) = stub.Transcribe(request, timeout=120).results
    return result


def test_the_export_detects_the_task_and_passes_its_gates(exported):
    manifest = json.loads((exported.model_dir / "1" / "manifest.json").read_text())
    assert (manifest["task"], manifest["model_type"]) == ("TASK_AUTOMATIC_SPEECH_RECOGNITION", "speech_to_text")
    validations = {variant["precision"]: variant["validation"] for variant in manifest["variants"]}
    assert validations.keys() == {"PRECISION_FP32", "PRECISION_INT8"}
    assert all(validation["passed"] for validation in validations.values())
    assert validations["PRECISION_FP32"]["max_abs_diff"] < 1e-4


def test_other_speech_seq2seq_models_are_refused_at_export_naming_the_served_ones(tmp_path):
    config = MoonshineConfig(architectures=["MoonshineForConditionalGeneration"])
    assert detect_task(tmp_path, config) == "automatic-speech-recognition"
    with pytest.raises(ExportError, match="served for whisper, speech_to_text models, not 'moonshine'"):
        check_exportable(config, task_spec("automatic-speech-recognition"))


@pytest.mark.parametrize("name", ["short", "window"])
def test_greedy_ids_and_text_match_generate_and_the_pipeline(stub, speech2text_checkpoint, name):
    result = transcribe(stub, CLIPS[name])
    expected = generate_ids(speech2text_checkpoint, CLIPS[name])
    assert list(result.token_ids) == expected
    assert len(set(expected)) > 3  # varied output: the comparison means something
    assert result.text == pipeline_text(speech2text_checkpoint, CLIPS[name])
    assert result.text and not result.chunks and not result.language


def test_unset_options_decode_as_generate_with_the_checkpoint_generation_config(stub, speech2text_checkpoint):
    request = inference_pb2.TranscribeRequest(model=MODEL, audios=[raw(CLIPS["short"])])
    (result,) = stub.Transcribe(request, timeout=120).results
    assert list(result.token_ids) == generate_ids(speech2text_checkpoint, CLIPS["short"], max_new_tokens=None)
    assert len(result.token_ids) == MAX_LENGTH - 1  # the random decoder never ends: the length bounds it


def test_beams_match_generate_and_the_pipeline(stub, speech2text_checkpoint):
    samples = CLIPS["short"]
    result = transcribe(stub, samples, parameters={"num_beams": 3})
    assert list(result.token_ids) == generate_ids(speech2text_checkpoint, samples, num_beams=3)
    assert result.text == pipeline_text(speech2text_checkpoint, samples, num_beams=3)
    assert list(result.token_ids) != list(transcribe(stub, samples).token_ids)  # beams chose otherwise here


def test_a_language_forces_its_token_as_generate_and_the_pipeline(stub, speech2text_checkpoint):
    samples = CLIPS["short"]
    french = asr_pipeline(speech2text_checkpoint).tokenizer.convert_tokens_to_ids("<lang:fr>")
    result = transcribe(stub, samples, language="fr")
    expected = generate_ids(speech2text_checkpoint, samples, forced_bos_token_id=french)
    assert list(result.token_ids) == expected
    assert expected[0] == french and expected != generate_ids(speech2text_checkpoint, samples)
    assert result.text == pipeline_text(speech2text_checkpoint, samples, forced_bos_token_id=french)


def test_a_batch_of_audios_of_different_lengths_answers_each_as_alone(stub, speech2text_checkpoint):
    names = ("short", "long", "window")
    request = inference_pb2.TranscribeRequest(
        model=MODEL,
        audios=[raw(CLIPS[name]) for name in names],
        parameters=inference_pb2.GenerationParameters(max_new_tokens=NEW_TOKENS),
    )
    together = stub.Transcribe(request, timeout=120).results
    assert [list(r.token_ids) for r in together] == [
        generate_ids(speech2text_checkpoint, CLIPS[name]) for name in names
    ]
    assert [r.text for r in together] == [transcribe(stub, CLIPS[name]).text for name in names]


def test_stream_sends_the_text_then_the_transcription(stub):
    request = inference_pb2.TranscribeStreamRequest(
        model=MODEL,
        audio=raw(CLIPS["window"]),
        parameters=inference_pb2.GenerationParameters(max_new_tokens=NEW_TOKENS),
    )
    messages = list(stub.TranscribeStream(request, timeout=120))
    unary = transcribe(stub, CLIPS["window"])
    assert [m.chunk.text for m in messages[:-1]] == [unary.text]
    assert messages[-1].transcription == unary
    assert messages[-1].metadata.tokens == len(unary.token_ids)


def test_a_cancelled_stream_stops(stub):
    request = inference_pb2.TranscribeStreamRequest(
        model=MODEL, audio=raw(CLIPS["long"]), parameters=inference_pb2.GenerationParameters(max_new_tokens=200)
    )
    call = stub.TranscribeStream(request, timeout=120)
    call.cancel()
    with pytest.raises(grpc.RpcError) as error:
        list(call)
    assert error.value.code() == grpc.StatusCode.CANCELLED
    assert transcribe(stub, CLIPS["short"]).token_ids  # the server goes on


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"return_timestamps": inference_pb2.TIMESTAMPS_SEGMENT}, "Speech2Text models give no timestamps"),
        ({"return_timestamps": inference_pb2.TIMESTAMPS_WORD}, "Speech2Text models give no timestamps"),
        ({"return_timestamps": inference_pb2.TIMESTAMPS_CHAR}, "Speech2Text models give no timestamps"),
        ({"language": "en"}, "has no language token <lang:en>"),
        ({"task": "translate"}, "take no task"),
        ({"chunk_length_s": 10}, "transcribe the whole audio at once"),
        ({"stride_length_s": 1}, "transcribe the whole audio at once"),
        ({"parameters": {"max_new_tokens": 300}}, "max_new_tokens is 300"),
        ({"parameters": {"num_beams": 0}}, "num_beams must be at least 1"),
    ],
)
def test_bad_requests_are_refused_naming_the_problem(stub, fields, words):
    parameters = inference_pb2.GenerationParameters(**fields.pop("parameters", {}))
    for request in (
        inference_pb2.TranscribeRequest(model=MODEL, audios=[raw(CLIPS["short"])], parameters=parameters, **fields),
        inference_pb2.TranscribeStreamRequest(model=MODEL, audio=raw(CLIPS["short"]), parameters=parameters, **fields),
    ):
        call = stub.Transcribe if isinstance(request, inference_pb2.TranscribeRequest) else stub.TranscribeStream
        with pytest.raises(grpc.RpcError) as error:
            list(call(request, timeout=60)) if call is stub.TranscribeStream else call(request, timeout=60)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in error.value.details()


def test_bad_audio_is_refused_naming_the_audio(stub):
    too_short = raw(CLIPS["short"][:200])  # under one 25 ms frame of filter banks
    broken = inference_pb2.Audio(data=b"RIFF\x00\x00\x00\x00WAVEnot really")
    for audios, words in (([raw(CLIPS["short"]), too_short], "shorter than one 25 ms frame"), ([broken], "audio 0")):
        with pytest.raises(grpc.RpcError) as error:
            stub.Transcribe(inference_pb2.TranscribeRequest(model=MODEL, audios=audios), timeout=60)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in error.value.details()
    assert transcribe(stub, CLIPS["short"]).token_ids  # the server goes on


def test_kserve_audio_transcribes_like_transcribe(stub, server):
    files = [encoded(CLIPS[name]) for name in ("short", "window")]
    request = inference_pb2.TranscribeRequest(model=MODEL, audios=[inference_pb2.Audio(data=file) for file in files])
    typed = stub.Transcribe(request, timeout=120).results
    with grpc.insecure_channel(server.target) as channel:
        response = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(audio_request(MODEL, files))
    assert output(response, "text").tolist() == [result.text for result in typed]


def test_int8_is_served_and_decodes_as_fp32_first(exported, start_server, stub):
    """The int8 variant (dynamic activations, per-token) loads past its gate and its greedy ids
    follow fp32's: measured, the whole 24 tokens on the 4 s and 12.5 s clips, 17 on the 37 s one."""
    int8_server = start_server({MODEL: exported}, precision="int8")
    parameters = inference_pb2.GenerationParameters(max_new_tokens=NEW_TOKENS)
    with grpc.insecure_channel(int8_server.target) as channel:
        int8_stub = inference_pb2_grpc.InferenceStub(channel)
        for samples in CLIPS.values():
            request = inference_pb2.TranscribeRequest(model=MODEL, audios=[raw(samples)], parameters=parameters)
            int8 = int8_stub.Transcribe(request, timeout=120)
            assert int8.metadata.precision == common_pb2.PRECISION_INT8
            fp32 = list(stub.Transcribe(request, timeout=120).results[0].token_ids)
            assert list(int8.results[0].token_ids)[: NEW_TOKENS // 3] == fp32[: NEW_TOKENS // 3]
