"""Every exported variant against PyTorch on sample inputs, judged by the gates of
server/quality/gates.py (the figures are described there), and the probes the server checks again
at load (server/quality/probes.py): a few of the samples with PyTorch's outputs for them.

Each variant runs where `--precision auto` serves it (`validation_device`): fp16 on the CUDA
provider when a GPU is usable here, everything else on the CPU provider, which every machine has; a
graph the provider cannot run (fp16 kernels some CPU builds lack) raises NotRunnable rather than
failing a gate. Text generation has its own gate, on greedy decoding and perplexity
(export/generative_gate.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import transformers
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
from onnxserve.export.audio import sample_input_values, sample_waveforms
from onnxserve.export.images import sample_images
from onnxserve.export.tasks import TaskSpec
from onnxserve.server.errors import ModelLoadError
from onnxserve.server.quality.gates import GATES, Sample, judge_outputs, with_probes
from onnxserve.server.quality.probes import PROBE_OUTPUT_BYTES, PROBE_ROWS, OutputProbes, main_outputs, probe_rows
from onnxserve.server.quality.runs import OUTPUT_FAMILIES, Batch, OutputFamily, Outputs
from onnxserve.server.runtime.sessions import CPU, CUDA, Session, SessionSettings, cuda_problem, cuda_provider_options
from transformers import PretrainedConfig, PreTrainedTokenizerFast

from onnxserve.v1 import manifest_pb2

# Varied on purpose: accents, CJK, emoji, runs of spaces, a one-letter and a long input.
TEXTS = (
    "I loved this film, the acting was superb!",
    "The service was slow and the food arrived cold.",
    "Café au lait in Zürich, naïve but fine.",
    "你好，世界。今天天气很好。",
    "Rockets 🚀 and smiles 🙂 everywhere",
    "São Paulo   has    several spaces.",
    "a",
    "The quick brown fox jumps over the lazy dog while the committee argues about the budget " * 3,
)
PAIRS = (
    ("Who wrote the report?", "The report was written by Marie Curie in Paris in 1911."),
    ("A man is playing a guitar.", "Someone plays an instrument."),
    ("Where is the café?", "The café is next to the old bridge, near the river."),
    ("The weather is nice today.", "It is raining heavily."),
)
CHOICES = ("in the kitchen.", "on the moon.", "with a friend.")
ZERO_SHOT_LABELS = ("a cat", "two dogs on a beach", "a red car", "a bowl of soup", "a city at night")
SAMPLE_MAX_LENGTH = 128

# What ONNX Runtime raises for a graph it cannot run here, e.g. NOT_IMPLEMENTED for a kernel its
# CPU provider lacks at some type; bad inputs (InvalidArgument) are bugs and are not caught.
CANNOT_RUN = (
    ort_state.Fail, ort_state.NotImplemented, ort_state.RuntimeException, ort_state.InvalidGraph, ort_state.EPFail,
)  # fmt: skip


class NotRunnable(Exception):
    """A variant that ONNX Runtime cannot run on this machine (e.g. fp16 kernels missing on CPU)."""


class Validator:
    """Builds the sample inputs and the PyTorch reference once, then checks variants against it."""

    def __init__(
        self,
        spec: TaskSpec,
        layout: str,
        checkpoint: Path,
        config: PretrainedConfig,
        tokenizer: PreTrainedTokenizerFast | None,
        image_processor: Any,
        pooling: int,
        max_length: int,
    ) -> None:
        self.spec = spec
        self.layout = layout  # the task's name, or the hand-built graphs' builder (CLIP's towers)
        self.family: OutputFamily = OUTPUT_FAMILIES[layout]
        self.pooling = pooling
        # Short samples: enough to exercise attention and padding, cheap on big models.
        inputs = _Inputs(tokenizer, config, min(max_length, SAMPLE_MAX_LENGTH), image_processor)
        self.batches = _INPUTS[layout](inputs)
        model = _reference_model(spec.auto_class, checkpoint)
        with torch.inference_mode():
            self.reference = [self._samples(self._run_torch(model, batch), batch) for batch in self.batches]
            self._probes = OutputProbes(layout, pooling, dict(GATES))
            for batch in self.batches:
                self._add_probe(model, batch)

    def _add_probe(self, model: torch.nn.Module, batch: Batch) -> None:
        """The batch's first rows and PyTorch's outputs for exactly them; fewer rows where the
        outputs are large (a big vocabulary's logits at every token)."""
        rows = PROBE_ROWS
        while True:
            probe = probe_rows(batch, rows)
            outputs = main_outputs(self._run_torch(model, probe))
            if rows == 1 or sum(value.nbytes for value in outputs.values()) <= PROBE_OUTPUT_BYTES:
                break
            rows -= 1
        self._probes.batches.append(probe)
        self._probes.references.append(outputs)

    def probes(self) -> OutputProbes:
        """What the server checks each variant on at load: a few samples, PyTorch's outputs for
        them, and the gates."""
        return self._probes

    def validate(self, graphs: dict[str, Path], precision: str) -> manifest_pb2.Validation:
        """The variant's figures and gate verdict; NotRunnable if ONNX Runtime cannot run it here."""
        device = validation_device(precision)
        sessions = {role: _session(path, device) for role, path in graphs.items()}
        exported = []
        for batch in self.batches:
            try:
                outputs = self.family.run_onnx(sessions, batch)
            except CANNOT_RUN as error:
                raise NotRunnable(f"ONNX Runtime failed to run it on the {device}: {error}") from error
            exported.append(self._samples(outputs, batch))
        reference = [s for samples in self.reference for s in samples]
        validation = judge_outputs(
            reference, [s for samples in exported for s in samples], self.family.logits, GATES[precision]
        )
        return with_probes(validation, self._check_probes(graphs, precision, device))

    def _check_probes(self, graphs: dict[str, Path], precision: str, device: str) -> manifest_pb2.Validation:
        """The load-time check, as the server will run it (its sessions, its options)."""
        try:
            served = {role: Session(path, SessionSettings(device=device)) for role, path in graphs.items()}
            return self._probes.check(served, precision)
        except (ModelLoadError, *CANNOT_RUN) as error:
            raise NotRunnable(f"ONNX Runtime failed to run it on the {device}: {error}") from error

    def _run_torch(self, model: torch.nn.Module, batch: Batch) -> Outputs:
        arguments = {name: torch.from_numpy(array) for name, array in batch.items()}
        if self.spec.generative:
            arguments["use_cache"] = False
        if self.layout == "clip_towers":
            return _clip_features(model, arguments)
        result = model(**arguments)
        return {key: value.numpy() for key, value in result.items() if isinstance(value, torch.Tensor)}

    def _samples(self, outputs: Outputs, batch: Batch) -> list[Sample]:
        return self.family.samples(outputs, batch, self.pooling)


def _clip_features(model: torch.nn.Module, arguments: dict[str, torch.Tensor]) -> Outputs:
    """What CLIP's tower graphs compute: get_text_features and get_image_features."""
    texts = model.get_text_features(input_ids=arguments["input_ids"], attention_mask=arguments["attention_mask"])
    images = model.get_image_features(pixel_values=arguments["pixel_values"])
    return {"text_embeds": texts.numpy(), "image_embeds": images.numpy()}


def _reference_model(auto_class: str | tuple[str, ...], checkpoint: Path) -> torch.nn.Module:
    """The PyTorch reference: the checkpoint loaded by the first of the task's auto classes that
    knows its architecture (image segmentation's semantic heads and DETR's panoptic one have none
    in common), as optimum's exporter tries them."""
    names = (auto_class,) if isinstance(auto_class, str) else auto_class
    for name in names[:-1]:
        try:
            return getattr(transformers, name).from_pretrained(checkpoint, dtype=torch.float32).eval()
        except ValueError:  # "Unrecognized configuration class ... for this kind of AutoModel"
            continue
    return getattr(transformers, names[-1]).from_pretrained(checkpoint, dtype=torch.float32).eval()


def validation_provider() -> str:
    """The provider the variants' figures come from, as the manifest's validated_on records it: the
    CUDA provider where fp16 was validated on a GPU, else the CPU's."""
    return CUDA if validation_device("fp16") == "cuda" else CPU


def validation_device(precision: str) -> str:
    """Where a variant is validated: where `--precision auto` serves it, so that its figures are
    those of the kernels that will run it. fp16 on a usable GPU (the CPU's fp16 kernels are other
    code, and some builds lack them), the rest on the CPU."""
    return "cuda" if precision == "fp16" and cuda_problem() is None else "cpu"


def _session(path: Path, device: str = "cpu") -> ort.InferenceSession:
    providers: list = [CPU]
    if device == "cuda":
        providers = [(CUDA, cuda_provider_options(0)), CPU]
    try:
        session = ort.InferenceSession(str(path), providers=providers)
    except CANNOT_RUN as error:
        raise NotRunnable(f"ONNX Runtime cannot load {path.name} on the {device}: {error}") from error
    if device == "cuda" and session.get_providers()[0] != CUDA:  # never the CPU's figures in the GPU's name
        raise NotRunnable(f"ONNX Runtime could not create the CUDA provider for {path.name}")
    return session


# --- each task's sample inputs ----------------------------------------------------------------


@dataclass(frozen=True)
class _Inputs:
    """What the sample inputs are made with: a tokenizer for text models, an image processor
    for vision models."""

    tokenizer: PreTrainedTokenizerFast | None
    config: PretrainedConfig
    max_length: int
    image_processor: Any = None

    def tokenize(self, *texts: Sequence[str]) -> Batch:
        encoded = self.tokenizer(*texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="np")
        return {name: array.astype(np.int64) for name, array in encoded.items()}


def _texts(inputs: _Inputs) -> list[Batch]:
    return [inputs.tokenize(list(TEXTS))]


def _texts_and_pairs(inputs: _Inputs) -> list[Batch]:
    firsts, seconds = zip(*PAIRS, strict=True)
    return [inputs.tokenize(list(TEXTS)), inputs.tokenize(list(firsts), list(seconds))]


def _questions(inputs: _Inputs) -> list[Batch]:
    firsts, seconds = zip(*PAIRS, strict=True)
    return [inputs.tokenize(list(firsts), list(seconds))]


def _masked_texts(inputs: _Inputs) -> list[Batch]:
    masked = [" ".join(inputs.tokenizer.mask_token if i == 1 else w for i, w in enumerate(t.split(" "))) for t in TEXTS]
    return [inputs.tokenize(masked)]


def _choices(inputs: _Inputs) -> list[Batch]:
    prompts = [first for first, _ in PAIRS]
    flat = inputs.tokenize([p for p in prompts for _ in CHOICES], [c for _ in prompts for c in CHOICES])
    return [{name: array.reshape(len(prompts), len(CHOICES), -1) for name, array in flat.items()}]


def _sources(inputs: _Inputs) -> list[Batch]:
    return [_with_decoder_start(inputs.tokenize(list(TEXTS)), inputs.config)]


def _captioned_images(inputs: _Inputs) -> list[Batch]:
    """Image-to-text: the sample images into the encoder, the decoder's first step."""
    return [_with_decoder_start(_images(inputs)[0], inputs.config)]


def _with_decoder_start(batch: Batch, config: PretrainedConfig) -> Batch:
    """An encoder-decoder's batch with the decoder's first input: each row's start token."""
    start = config.decoder_start_token_id
    start = config.pad_token_id if start is None else start
    rows = next(iter(batch.values())).shape[0]
    return batch | {"decoder_input_ids": np.full([rows, 1], start, dtype=np.int64)}


def _waveforms(inputs: _Inputs) -> list[Batch]:
    """The sample waveforms, one batch each (the graphs take no attention mask, so nothing is padded)."""
    return [{"input_values": values[np.newaxis]} for values in sample_input_values()]


def _spoken(inputs: _Inputs) -> list[Batch]:
    """Whisper: the sample waveforms' log-mel features (transformers' extractor at the model's mel
    count; every Whisper checkpoint keeps its other settings), decoded from the prompt
    transcription starts from. Speech2Text: `_filter_banks`."""
    if inputs.config.model_type == "speech_to_text":
        return _filter_banks(inputs)
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=inputs.config.num_mel_bins)
    features = extractor(sample_waveforms(extractor.sampling_rate), sampling_rate=extractor.sampling_rate)
    tokens = ["<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    known = [token_id for token_id in inputs.tokenizer.convert_tokens_to_ids(tokens) if token_id is not None]
    prompt = [inputs.config.decoder_start_token_id] + [t for t in known if t != inputs.tokenizer.unk_token_id]
    rows = len(features["input_features"])
    return [{
        "input_features": np.asarray(features["input_features"], dtype=np.float32),
        "decoder_input_ids": np.tile(np.array([prompt], dtype=np.int64), (rows, 1)),
    }]  # fmt: skip


def _filter_banks(inputs: _Inputs) -> list[Batch]:
    """Speech2Text: the sample waveforms' Kaldi filter banks (transformers' extractor at the
    model's bin count), padded to the longest with their attention mask, which both graphs take
    over the feature frames (its decoder subsamples it as the encoder subsamples the frames)."""
    from transformers import Speech2TextFeatureExtractor

    bins = inputs.config.input_feat_per_channel
    extractor = Speech2TextFeatureExtractor(feature_size=bins, num_mel_bins=bins)
    waves, rate = sample_waveforms(extractor.sampling_rate), extractor.sampling_rate
    features = extractor(waves, sampling_rate=rate, padding=True, return_tensors="np")
    rows = len(features["input_features"])
    return [{
        "input_features": features["input_features"].astype(np.float32),
        "attention_mask": features["attention_mask"].astype(np.int64),
        "decoder_input_ids": np.full((rows, 1), inputs.config.decoder_start_token_id, dtype=np.int64),
    }]  # fmt: skip


def _images(inputs: _Inputs) -> list[Batch]:
    """The sample images as the checkpoint's own image processor makes them."""
    pixels = inputs.image_processor(images=sample_images(), return_tensors="np")["pixel_values"]
    return [{"pixel_values": pixels.astype(np.float32)}]


def _hypotheses_and_images(inputs: _Inputs) -> list[Batch]:
    """CLIP: the sample images against a few hypotheses, as the zero-shot pipeline writes them."""
    texts = inputs.tokenize([f"This is a photo of {label}." for label in ZERO_SHOT_LABELS])
    return [texts | _images(inputs)[0]]


def _masked_images(inputs: _Inputs) -> list[Batch]:
    """The sample images with a fixed random half of their patches masked."""
    batch = _images(inputs)[0]
    patches = (inputs.config.image_size // inputs.config.patch_size) ** 2
    rng = np.random.default_rng(14)
    batch["bool_masked_pos"] = rng.random((len(batch["pixel_values"]), patches)) < 0.5
    return [batch]


# Each task's sample inputs (or hand-built graphs'); how its graphs run and what a sample's output
# is: OUTPUT_FAMILIES.
_INPUTS = {
    "feature-extraction": _texts,
    "text-classification": _texts_and_pairs,
    "token-classification": _texts,
    "question-answering": _questions,
    "fill-mask": _masked_texts,
    "multiple-choice": _choices,
    "text2text-generation": _sources,
    "image-to-text": _captioned_images,
    "image-classification": _images,
    "ctc-speech-recognition": _waveforms,
    "automatic-speech-recognition": _spoken,
    "audio-classification": _waveforms,
    "object-detection": _images,
    "image-segmentation": _images,
    "zero-shot-image-classification": _hypotheses_and_images,
    "image-feature-extraction": _images,
    "clip_towers": _hypotheses_and_images,
    "masked_image_modeling": _masked_images,
}
