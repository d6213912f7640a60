"""Whisper's word timestamps (TIMESTAMPS_WORD) at parity with transformers: the tiny random
Whisper of test_transcribe_whisper, with three alignment heads over both decoder layers, exported
(with its alignment graph) and served; its words and their times against the
automatic-speech-recognition pipeline's return_timestamps="word" on one window and on a 37 s clip
chunked with stride.

The oracle is the pipeline's own preprocessing (chunking, attention masks) and postprocessing
(`_decode_asr`: merging, word grouping, punctuation), with each window's ids and token timestamps
from the generation loop with output_attentions and Whisper's `_extract_token_timestamps` over
them, as `WhisperForConditionalGeneration.generate` computes them. Its own wrapper is not called:
in transformers 4.57 it decodes a window again from its last timestamp pair (past max_new_tokens),
which the served decoding (one pass per window, as test_transcribe_whisper checks) does not.

Times may differ by one frame (0.02 s): ONNX Runtime's attention weights differ from PyTorch's in
the last bits, and dynamic time warping picks one of two near-equal paths by that difference."""

from __future__ import annotations

import shutil
from functools import cache
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from onnxserve.server.tasks.word_timestamps import ALIGNMENT_ROLE, dynamic_time_warping, median_filter, words
from transformers import (
    GenerationConfig,
    GenerationMixin,
    LogitsProcessorList,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
    WhisperForConditionalGeneration,
    WhisperTimeStampLogitsProcessor,
)
from transformers.models.whisper.generation_whisper import _dynamic_time_warping, _median_filter
from transformers.models.whisper.tokenization_whisper import _collate_word_timestamps

from onnxserve.kserve_v2 import grpc_predict_v2_pb2_grpc as v2_grpc
from onnxserve.repository import read_manifest, write_manifest
from onnxserve.v1 import inference_pb2, inference_pb2_grpc
from tests.conftest import Exported
from tests.speech import audio_request, encoded
from tests.test_kserve import output
from tests.test_transcribe_whisper import CLIPS, asr_pipeline, build_whisper, raw, whisper_tokenizer

MODEL = "whisper-words"
NEW_TOKENS = 40
HEADS = [[0, 2], [1, 0], [1, 3]]
FRAME = 0.02  # one step of the warping path, in seconds


def build_aligned_whisper(directory: Path) -> Path:
    build_whisper(directory)
    config = GenerationConfig.from_pretrained(directory)
    config.alignment_heads = HEADS
    config.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def aligned_checkpoint(tmp_path_factory) -> Path:
    return build_aligned_whisper(tmp_path_factory.mktemp("whisper-words"))


@pytest.fixture(scope="module")
def exported(export, aligned_checkpoint) -> Exported:
    return export(MODEL, precisions=("fp32", "int8"), source=aligned_checkpoint)


@pytest.fixture(scope="module")
def lacking(exported, tmp_path_factory) -> dict[str, Exported]:
    """Copies of the export without the alignment graph (as exported before it was written), and
    also without alignment heads in generation_config.json (a model that has none)."""
    copies = {}
    for name, drop_heads in (("no-graph", False), ("no-heads", True)):
        model_dir = tmp_path_factory.mktemp(name) / name
        shutil.copytree(exported.model_dir, model_dir)
        (version,) = [child for child in model_dir.iterdir() if child.is_dir()]
        manifest = read_manifest(version)
        for variant in manifest.variants:
            kept = [file for file in variant.files if file.role != ALIGNMENT_ROLE]
            del variant.files[:]
            variant.files.extend(kept)
        write_manifest(version, manifest)
        if drop_heads:
            config = GenerationConfig.from_pretrained(version)
            del config.alignment_heads
            config.save_pretrained(version)
        copies[name] = Exported(name, exported.checkpoint, model_dir)
    return copies


@pytest.fixture(scope="module")
def server(exported, lacking, start_server):
    return start_server({MODEL: exported, **lacking}, precision="fp32")


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


@cache
def eager_model(checkpoint: Path) -> WhisperForConditionalGeneration:
    """The reference with eager attention, which returns the attention weights (generate() switches
    to it for token timestamps)."""
    return WhisperForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="eager").eval()


def ids_and_token_timestamps(checkpoint: Path, item: dict, num_beams: int = 1) -> tuple[list[int], list[float]]:
    """One window as Whisper's generate() decodes it with timestamps in English (its prompt and
    logits processors), and its token timestamps as generate() computes them for
    return_token_timestamps: `_extract_token_timestamps` over the loop's cross-attentions (the
    best beam's, by its beam indices), the frames cut to the window's attention mask."""
    model = eager_model(checkpoint)
    config = model.generation_config
    prompt = [config.decoder_start_token_id, config.lang_to_id["<|en|>"], config.task_to_id["transcribe"]]
    processors = LogitsProcessorList([
        SuppressTokensAtBeginLogitsProcessor(config.begin_suppress_tokens, len(prompt)),
        SuppressTokensLogitsProcessor(config.suppress_tokens),
        WhisperTimeStampLogitsProcessor(config, begin_index=len(prompt)),
    ])  # fmt: skip
    ids_of = {name: getattr(config, name) for name in ("eos_token_id", "pad_token_id", "decoder_start_token_id")}
    settings = GenerationConfig(
        max_new_tokens=NEW_TOKENS,
        num_beams=num_beams,
        do_sample=False,
        output_attentions=True,
        return_dict_in_generate=True,
        **ids_of,
    )
    with torch.inference_mode():
        outputs = GenerationMixin.generate(
            model,
            input_features=item["input_features"],
            decoder_input_ids=torch.tensor([prompt]),
            logits_processor=processors,
            generation_config=settings,
        )
        stamps = model._extract_token_timestamps(
            outputs, config.alignment_heads, num_frames=item["attention_mask"].sum(-1), num_input_ids=len(prompt)
        )
    ids = outputs.sequences[0, len(prompt) :].tolist()
    ids = ids[:-1] if ids and ids[-1] == config.eos_token_id else ids
    return ids, stamps[0, len(prompt) : len(prompt) + len(ids)].tolist()


def pipeline_words(
    checkpoint: Path, samples: np.ndarray, chunk_length_s: float = 0, num_beams: int = 1
) -> tuple[dict, list[int]]:
    """The pipeline's result with return_timestamps="word", and the windows' ids."""
    pipe = asr_pipeline(checkpoint)
    outputs, all_ids = [], []
    for item in pipe.preprocess(samples.copy(), chunk_length_s=chunk_length_s):
        ids, stamps = ids_and_token_timestamps(checkpoint, item, num_beams)
        output = {"tokens": torch.tensor([ids]), "token_timestamps": torch.tensor([stamps]), "is_last": item["is_last"]}
        if "stride" in item:
            output["stride"] = item["stride"]
        outputs.append(output)
        all_ids += ids
    return pipe.postprocess(outputs, return_timestamps="word"), all_ids


def transcribe(
    stub, samples: np.ndarray, model: str = MODEL, num_beams: int = 1, **fields: object
) -> inference_pb2.Transcription:
    request = inference_pb2.TranscribeRequest(
        model=model,
        audios=[raw(samples)],
        language="en",
        return_timestamps=inference_pb2.TIMESTAMPS_WORD,
        parameters=inference_pb2.GenerationParameters(max_new_tokens=NEW_TOKENS, num_beams=num_beams),
        **fields,
    )
    (result,) = stub.Transcribe(request, timeout=120).results
    return result


def assert_same_words(served: inference_pb2.Transcription, expected: dict) -> None:
    words = [(chunk.text, chunk.start, chunk.end) for chunk in served.chunks]
    assert [text for text, _, _ in words] == [chunk["text"] for chunk in expected["chunks"]]
    for (text, start, end), chunk in zip(words, expected["chunks"], strict=True):
        assert chunk["timestamp"] == pytest.approx((start, end), abs=FRAME + 1e-4), text
    assert all(chunk.HasField("end") and chunk.start <= chunk.end for chunk in served.chunks)


@pytest.mark.parametrize(
    ("clip", "chunk_length_s", "num_beams"),
    [("window", 0, 1), ("long", 30, 1), ("window", 0, 3)],
    ids=["one-window", "chunked", "beams"],  # greedy calls share decode steps; beam search decodes alone
)
def test_words_match_the_pipeline(stub, aligned_checkpoint, clip, chunk_length_s, num_beams):
    samples = CLIPS[clip]
    served = transcribe(stub, samples, num_beams=num_beams, chunk_length_s=chunk_length_s)
    expected, ids = pipeline_words(aligned_checkpoint, samples, chunk_length_s, num_beams)
    assert list(served.token_ids) == ids
    assert served.text == expected["text"]
    assert_same_words(served, expected)
    assert len(served.chunks) > 3  # varied words: the comparison means something
    assert len({chunk.start for chunk in served.chunks}) > 2  # and times that move along the audio


def test_the_stream_sends_the_words(stub):
    request = inference_pb2.TranscribeStreamRequest(
        model=MODEL,
        audio=raw(CLIPS["long"]),
        language="en",
        return_timestamps=inference_pb2.TIMESTAMPS_WORD,
        parameters=inference_pb2.GenerationParameters(max_new_tokens=NEW_TOKENS),
    )
    messages = list(stub.TranscribeStream(request, timeout=120))
    unary = transcribe(stub, CLIPS["long"])
    assert messages[-1].transcription == unary
    assert [message.chunk for message in messages[:-1]] == list(unary.chunks)


def test_every_variant_lists_the_fp32_alignment_graph(exported):
    (version,) = [child for child in exported.model_dir.iterdir() if child.is_dir()]
    files = {
        variant.precision: {file.role: file.path for file in variant.files}
        for variant in read_manifest(version).variants
    }
    assert len(files) == 2
    assert {paths[ALIGNMENT_ROLE] for paths in files.values()} == {"alignment.onnx"}


@pytest.mark.parametrize(
    ("model", "words"),
    [
        ("no-graph", "lacks (it was exported before onnxserve wrote one): re-export"),
        ("no-heads", "generation_config.json names none (alignment_heads)"),
    ],
)
def test_word_timestamps_without_alignment_heads_are_refused(stub, model, words):
    with pytest.raises(grpc.RpcError) as error:
        transcribe(stub, CLIPS["short"], model=model)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in error.value.details()
    plain = inference_pb2.TranscribeRequest(model=model, audios=[raw(CLIPS["short"])], language="en")
    assert stub.Transcribe(plain, timeout=120).results[0].token_ids  # the model still transcribes


@pytest.mark.parametrize("shape", [(1, 5), (3, 40), (17, 300), (40, 750)])
def test_warping_and_median_filter_equal_transformers(shape):
    rng = np.random.default_rng(shape[0])
    matrix = rng.standard_normal(shape).astype(np.float32)
    for costs in (matrix, np.round(matrix * 2) / 2):  # the second full of ties
        expected = _dynamic_time_warping(-costs.astype(np.float64))
        got = dynamic_time_warping(-costs.astype(np.float64))
        assert [a.tolist() for a in got] == [a.tolist() for a in expected]
    weights = rng.standard_normal((3, *shape)).astype(np.float32)
    assert np.array_equal(median_filter(weights, 7), _median_filter(torch.from_numpy(weights), 7).numpy())


@pytest.mark.parametrize(
    ("text", "language", "transformers_language"),
    [
        (' "Hello," she said (quietly). Wasn\'t it - a  naïve: test? Yes!', "en", "english"),
        (" 我们今天去公园，好吗？ 好的。", "zh", "chinese"),
    ],
)
def test_words_group_as_transformers_does(text, language, transformers_language):
    tokenizer = whisper_tokenizer()
    tokens = tokenizer.encode(text, add_special_tokens=False)
    spans = [(round(0.1 * i, 2), round(0.1 * i + 0.1, 2)) for i in range(len(tokens))]
    expected = _collate_word_timestamps(tokenizer, tokens, spans, transformers_language, False)
    got = words(tokens, spans, tokenizer.decode, language)
    assert [(word.text, (word.start, word.end)) for word in got] == [(w["text"], w["timestamp"]) for w in expected]
    assert len(got) > 3


def test_kserve_audio_gives_the_words(stub, server):
    """A KServe v2 `audio` input with return_timestamps=word answers as Transcribe."""
    files = [encoded(CLIPS["short"]), encoded(CLIPS["window"])]
    parameters = {"return_timestamps": "word", "language": "en", "max_new_tokens": NEW_TOKENS}
    typed = stub.Transcribe(
        inference_pb2.TranscribeRequest(
            model=MODEL,
            audios=[inference_pb2.Audio(data=file) for file in files],
            language="en",
            return_timestamps=inference_pb2.TIMESTAMPS_WORD,
            parameters=inference_pb2.GenerationParameters(max_new_tokens=NEW_TOKENS),
        ),
        timeout=120,
    ).results
    with grpc.insecure_channel(server.target) as channel:
        response = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(audio_request(MODEL, files, **parameters))
    assert output(response, "text").tolist() == [result.text for result in typed]
    texts, starts, ends = (output(response, name) for name in ("chunk_text", "start", "end"))
    for row, result in enumerate(typed):
        count = len(result.chunks)
        assert count > 3
        assert texts[row][:count].tolist() == [chunk.text for chunk in result.chunks]
        assert starts[row][:count].tolist() == [chunk.start for chunk in result.chunks]
        assert ends[row][:count].tolist() == [chunk.end for chunk in result.chunks]
