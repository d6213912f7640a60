"""Transcribe and TranscribeStream on Whisper at parity with transformers: a tiny random
WhisperForConditionalGeneration (multilingual special tokens, timestamps, suppressed tokens) built
here, exported by the real exporter and served; its token ids against `generate()` (greedy,
beams, language given or detected, timestamps) and its text and segments against the
automatic-speech-recognition pipeline (one window, and a 37 s clip chunked with stride)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, trainers
from tokenizers import decoders as token_decoders
from tokenizers import pre_tokenizers as pre
from transformers import (
    GenerationConfig,
    GenerationMixin,
    LogitsProcessorList,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTimeStampLogitsProcessor,
    WhisperTokenizerFast,
)

from onnxserve.kserve_v2 import grpc_predict_v2_pb2_grpc as v2_grpc
from onnxserve.v1 import inference_pb2, inference_pb2_grpc
from tests.checkpoints import CORPUS, SEED
from tests.speech import RATE, audio_request, encoded, speech_like
from tests.test_kserve import output

LANGUAGES = ("en", "de", "fr")
SPECIAL = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    *(f"<|{code}|>" for code in LANGUAGES),
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
]
TIMESTAMPS = 1501  # <|0.00|> to <|30.00|>, after <|notimestamps|>
NEW_TOKENS = 24
MODEL = "whisper"
LANGUAGE_CODES = {"en": "en", "german": "de", "": None}


def whisper_tokenizer() -> WhisperTokenizerFast:
    """Byte-level BPE as Whisper's, with its special tokens after the text pieces (timestamps
    follow them in the model's vocabulary only, as in OpenAI's tokenizer files)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre.ByteLevel(add_prefix_space=False)
    backend.decoder = token_decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    tokenizer = WhisperTokenizerFast(
        tokenizer_object=backend, additional_special_tokens=SPECIAL[1:], model_max_length=448
    )
    tokenizer.add_special_tokens({"eos_token": SPECIAL[0], "bos_token": SPECIAL[0], "unk_token": SPECIAL[0]})
    return tokenizer


def whisper_model(tokenizer: WhisperTokenizerFast) -> WhisperForConditionalGeneration:
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL}
    end, start = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    config = WhisperConfig(
        vocab_size=ids["<|notimestamps|>"] + 1 + TIMESTAMPS,
        num_mel_bins=80,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=1500,
        max_target_positions=448,
        init_std=0.1,
        bos_token_id=end,
        eos_token_id=end,
        pad_token_id=end,
        decoder_start_token_id=start,
    )
    torch.manual_seed(SEED)
    model = WhisperForConditionalGeneration(config)
    with torch.no_grad():  # positions that make each step differ, as for the other tiny seq2seq models
        model.model.decoder.embed_positions.weight.mul_(10)
    model.generation_config = GenerationConfig(
        bos_token_id=end,
        eos_token_id=end,
        pad_token_id=end,
        decoder_start_token_id=start,
        max_length=448,
        suppress_tokens=[ids["<|startoflm|>"], ids["<|nocaptions|>"], 7, 8],
        begin_suppress_tokens=[tokenizer.convert_tokens_to_ids("Ġ"), end],
        no_timestamps_token_id=ids["<|notimestamps|>"],
        is_multilingual=True,
        lang_to_id={f"<|{code}|>": ids[f"<|{code}|>"] for code in LANGUAGES},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        forced_decoder_ids=[[1, None], [2, ids["<|transcribe|>"]]],
        alignment_heads=[[1, 0]],
        max_initial_timestamp_index=50,
        return_timestamps=False,
    )
    return model.eval()


def build_whisper(directory: Path) -> Path:
    tokenizer = whisper_tokenizer()
    whisper_model(tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(directory)
    return directory


CLIPS = {"short": speech_like(4.0, 1), "window": speech_like(12.5, 2), "long": speech_like(37.0, 3)}


def raw(samples: np.ndarray) -> inference_pb2.Audio:
    return inference_pb2.Audio(raw=inference_pb2.RawAudio(samples=samples.tobytes(), sample_rate=RATE, channels=1))


@pytest.fixture(scope="module")
def whisper_checkpoint(tmp_path_factory) -> Path:
    return build_whisper(tmp_path_factory.mktemp("whisper"))


@pytest.fixture(scope="module")
def exported(export, whisper_checkpoint):
    return export(MODEL, precisions=("fp32",), source=whisper_checkpoint)


@pytest.fixture(scope="module")
def server(exported, start_server):
    return start_server({MODEL: exported}, precision="fp32")


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


@cache
def reference_model(checkpoint: Path) -> WhisperForConditionalGeneration:
    return WhisperForConditionalGeneration.from_pretrained(checkpoint).eval()


def generate_ids(
    checkpoint: Path,
    features: torch.Tensor,
    language: str | None = None,
    task: str = "transcribe",
    timestamps: bool = False,
    **settings: object,
) -> list[int]:
    """transformers' generate() on one window as Whisper's generate() runs each window: its
    decoder prompt, language detection (detect_language) and logits processors, through the
    generation loop itself. (WhisperForConditionalGeneration.generate's own wrapper is not the
    oracle: in transformers 4.57 its short-form path returned ids past max_new_tokens, and its
    return_dict path logits that differ from the model's forward.)"""
    model = reference_model(checkpoint)
    config = model.generation_config
    with torch.inference_mode():
        code = language or next(
            token for token, token_id in config.lang_to_id.items() if token_id == model.detect_language(features)[0]
        ).strip("<|>")
        prompt = [config.decoder_start_token_id, config.lang_to_id[f"<|{code}|>"], config.task_to_id[task]]
        prompt += [] if timestamps else [config.no_timestamps_token_id]
        processors = [
            SuppressTokensAtBeginLogitsProcessor(config.begin_suppress_tokens, len(prompt)),
            SuppressTokensLogitsProcessor(config.suppress_tokens),
        ]
        if timestamps:
            processors.append(WhisperTimeStampLogitsProcessor(config, begin_index=len(prompt)))
        ids_of = {name: getattr(config, name) for name in ("eos_token_id", "pad_token_id", "decoder_start_token_id")}
        settings = GenerationConfig(**{"max_new_tokens": NEW_TOKENS, "do_sample": False, **ids_of, **settings})
        ids = GenerationMixin.generate(
            model,
            input_features=features,
            decoder_input_ids=torch.tensor([prompt]),
            logits_processor=LogitsProcessorList(processors),
            generation_config=settings,
        )[0, len(prompt) :].tolist()
    return ids[:-1] if ids and ids[-1] == config.eos_token_id else ids


def features_of(checkpoint: Path, samples: np.ndarray) -> torch.Tensor:
    return WhisperFeatureExtractor.from_pretrained(checkpoint)(
        samples, sampling_rate=RATE, return_tensors="pt"
    ).input_features


@cache
def asr_pipeline(checkpoint: Path):
    from transformers import pipeline

    return pipeline("automatic-speech-recognition", model=str(checkpoint), device="cpu")


def pipeline_result(checkpoint: Path, samples: np.ndarray, timestamps: bool, chunk_length_s: float = 0) -> dict:
    """The automatic-speech-recognition pipeline's preprocessing (chunking with stride) and
    postprocessing (merging, timestamps), with each window's ids from `generate_ids`."""
    pipe = asr_pipeline(checkpoint)
    outputs = []
    for item in pipe.preprocess(samples.copy(), chunk_length_s=chunk_length_s):
        ids = generate_ids(checkpoint, item["input_features"], language="en", timestamps=timestamps)
        output = {"tokens": torch.tensor([ids]), "is_last": item["is_last"]}
        if "stride" in item:
            output["stride"] = item["stride"]
        outputs.append(output)
    return pipe.postprocess(outputs, return_timestamps=timestamps)


def with_starts(chunks: list[dict]) -> list[dict]:
    """The pipeline's chunks with the contract's start for a piece Whisper never opened (None in
    the pipeline): the previous chunk's end, or 0."""
    previous_end = 0.0
    for chunk in chunks:
        start, end = chunk["timestamp"]
        chunk["timestamp"] = (previous_end if start is None else start, end)
        previous_end = chunk["timestamp"][1] if end is not None else chunk["timestamp"][0]
    return chunks


def transcribe(stub, samples: np.ndarray, **fields: object) -> inference_pb2.Transcription:
    parameters = inference_pb2.GenerationParameters(max_new_tokens=NEW_TOKENS, **fields.pop("parameters", {}))
    request = inference_pb2.TranscribeRequest(model=MODEL, audios=[raw(samples)], parameters=parameters, **fields)
    (result,) = stub.Transcribe(request, timeout=120).results
    return result


@pytest.mark.parametrize("language", ["en", "german", ""], ids=["code", "name", "detected"])
def test_greedy_ids_match_generate(stub, whisper_checkpoint, language):
    for name in ("short", "window"):
        result = transcribe(stub, CLIPS[name], language=language)
        expected = generate_ids(
            whisper_checkpoint, features_of(whisper_checkpoint, CLIPS[name]), LANGUAGE_CODES[language]
        )
        assert list(result.token_ids) == expected
        assert len(set(expected)) > 3  # varied output: the comparison means something
        assert result.language in LANGUAGES


def test_translate_and_beams_match_generate(stub, whisper_checkpoint):
    samples = CLIPS["short"]
    result = transcribe(stub, samples, language="fr", task="translate", parameters={"num_beams": 3})
    features = features_of(whisper_checkpoint, samples)
    assert list(result.token_ids) == generate_ids(whisper_checkpoint, features, "fr", task="translate", num_beams=3)


def test_timestamps_match_generate_and_the_pipeline(stub, whisper_checkpoint):
    samples = CLIPS["window"]
    result = transcribe(stub, samples, language="en", return_timestamps=inference_pb2.TIMESTAMPS_SEGMENT)
    features = features_of(whisper_checkpoint, samples)
    assert list(result.token_ids) == generate_ids(whisper_checkpoint, features, "en", timestamps=True)
    expected = pipeline_result(whisper_checkpoint, samples, timestamps=True)
    assert result.text == expected["text"]
    served = [(c.text, round(c.start, 2), round(c.end, 2) if c.HasField("end") else None) for c in result.chunks]
    assert served == [(c["text"], *c["timestamp"]) for c in with_starts(expected["chunks"])]
    assert len(served) > 1


@pytest.mark.parametrize("timestamps", [False, True], ids=["text", "segments"])
def test_a_37_second_clip_is_chunked_and_merged_as_the_pipeline_does(stub, whisper_checkpoint, timestamps):
    samples = CLIPS["long"]
    mode = inference_pb2.TIMESTAMPS_SEGMENT if timestamps else inference_pb2.TIMESTAMPS_UNSPECIFIED
    result = transcribe(stub, samples, language="en", return_timestamps=mode)
    expected = pipeline_result(whisper_checkpoint, samples, timestamps, chunk_length_s=30)
    assert result.text == expected["text"]
    assert len(result.text) > 10
    if timestamps:
        served = [(c.text, round(c.start, 2), round(c.end, 2) if c.HasField("end") else None) for c in result.chunks]
        assert served == [(c["text"], *c["timestamp"]) for c in with_starts(expected["chunks"])]


def test_a_batch_of_audios_answers_each_as_alone(stub):
    request = inference_pb2.TranscribeRequest(
        model=MODEL,
        audios=[raw(CLIPS["short"]), raw(CLIPS["long"]), raw(CLIPS["window"])],
        language="en",
        parameters=inference_pb2.GenerationParameters(max_new_tokens=NEW_TOKENS),
    )
    together = stub.Transcribe(request, timeout=120).results
    alone = [transcribe(stub, CLIPS[name], language="en") for name in ("short", "long", "window")]
    assert [r.text for r in together] == [r.text for r in alone]
    assert [list(r.token_ids) for r in together] == [list(r.token_ids) for r in alone]


def test_stream_sends_segments_then_the_transcription(stub):
    for name in ("window", "long"):
        request = inference_pb2.TranscribeStreamRequest(
            model=MODEL,
            audio=raw(CLIPS[name]),
            language="en",
            return_timestamps=inference_pb2.TIMESTAMPS_SEGMENT,
            parameters=inference_pb2.GenerationParameters(max_new_tokens=NEW_TOKENS),
        )
        messages = list(stub.TranscribeStream(request, timeout=120))
        last = messages[-1]
        unary = transcribe(stub, CLIPS[name], language="en", return_timestamps=inference_pb2.TIMESTAMPS_SEGMENT)
        assert last.transcription == unary
        assert last.metadata.tokens == len(unary.token_ids)
        assert [m.chunk for m in messages[:-1]] == list(unary.chunks)
        assert len(messages) >= 2


def test_a_cancelled_stream_stops(stub):
    request = inference_pb2.TranscribeStreamRequest(
        model=MODEL,
        audio=raw(CLIPS["long"]),
        parameters=inference_pb2.GenerationParameters(max_new_tokens=400),
    )
    call = stub.TranscribeStream(request, timeout=120)
    call.cancel()
    with pytest.raises(grpc.RpcError) as error:
        list(call)
    assert error.value.code() == grpc.StatusCode.CANCELLED
    assert transcribe(stub, CLIPS["short"], language="en").token_ids  # the server goes on


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"language": "klingon"}, "unknown language 'klingon'"),
        ({"task": "summarize"}, "unknown task 'summarize'"),
        ({"return_timestamps": inference_pb2.TIMESTAMPS_CHAR}, "character timestamps are for CTC models"),
        ({"chunk_length_s": 45}, "Whisper's window is 30 s"),
        ({"chunk_length_s": 10, "stride_length_s": 6}, "longer than twice stride_length_s"),
        ({"parameters": {"max_new_tokens": 446}}, "max_new_tokens is 446"),
        ({"parameters": {"num_beams": 0}}, "num_beams must be at least 1"),
    ],
)
def test_bad_requests_are_refused_naming_the_problem(stub, fields, words):
    parameters = inference_pb2.GenerationParameters(**fields.pop("parameters", {}))
    request = inference_pb2.TranscribeRequest(
        model=MODEL, audios=[raw(CLIPS["short"])], parameters=parameters, **fields
    )
    with pytest.raises(grpc.RpcError) as error:
        stub.Transcribe(request, timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in error.value.details()


def test_kserve_audio_transcribes_like_transcribe(stub, server):
    files = [encoded(CLIPS[name]) for name in ("short", "window")]
    audios = [inference_pb2.Audio(data=file) for file in files]
    request = inference_pb2.TranscribeRequest(model=MODEL, audios=audios, language="de")
    typed = stub.Transcribe(request, timeout=120).results
    with grpc.insecure_channel(server.target) as channel:
        response = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(audio_request(MODEL, files, language="de"))
    assert output(response, "text").tolist() == [result.text for result in typed]


def test_bad_audio_is_refused_naming_the_audio(stub):
    broken = inference_pb2.Audio(data=b"RIFF\x00\x00\x00\x00WAVEnot really")
    request = inference_pb2.TranscribeRequest(model=MODEL, audios=[raw(CLIPS["short"]), broken])
    with pytest.raises(grpc.RpcError) as error:
        stub.Transcribe(request, timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "audio 1" in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        stub.Transcribe(inference_pb2.TranscribeRequest(model=MODEL), timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
