"""Every exported variant against PyTorch on sample inputs, and the gates a variant must pass.

Each sample's main output is compared over the tokens its attention mask keeps (padding rows are
undefined and fused attention kernels need not agree there):
  - max_abs_diff: the largest absolute difference of the main output (last_hidden_state, logits,
    start/end logits; for seq2seq generation the first decoder step's logits);
  - top1_agreement (logits only): the share of top-1 predictions (argmax over the last axis: one per
    sample for sequence-level heads, one per kept token for token-level heads) that agree. A
    near-tie, where the reference's probabilities (softmax over the last axis) for its top-1 and
    the variant's differ by less than NEAR_TIE, agrees: the reference has no real preference there,
    and rounding may pick either (random test models and uncertain language-model positions have
    many such);
  - mean/min cosine: per sample, between pooled embeddings for feature extraction, else between
    the sample's flattened logits.
Each variant runs where `--precision auto` serves it (`validation_device`): fp16 on the CUDA
provider when a GPU is usable here, everything else on the CPU provider, which every machine has; a
graph the provider cannot run (fp16 kernels some CPU builds lack) raises NotRunnable rather than
failing a gate. Text generation has its own gate, on greedy decoding and perplexity
(export/generative_gate.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import transformers
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
from onnxserve.export.tasks import TaskSpec
from onnxserve.server.runtime.sessions import CPU, CUDA, cuda_problem, cuda_provider_options
from transformers import PretrainedConfig, PreTrainedTokenizerFast

from onnxserve.v1 import common_pb2, manifest_pb2

Batch = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]

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
SAMPLE_MAX_LENGTH = 128
NEAR_TIE = 0.01  # see top1_agreement above


@dataclass(frozen=True)
class Gate:
    """Bounds a variant must meet; None where a bound does not apply."""

    max_abs_diff: float | None = None  # times the largest reference magnitude, at least 1
    min_top1: float | None = None  # logits only
    min_mean_cosine: float | None = None
    min_min_cosine: float | None = None


GATES = {
    # The reference export: the graph optimizations must keep PyTorch's numbers.
    "fp32": Gate(max_abs_diff=1e-3, min_top1=1.0),
    # fp16 keeps about three significant digits: close in direction, clear predictions kept.
    "fp16": Gate(min_top1=0.98, min_min_cosine=0.999),
    # int8 weights move outputs more; embeddings must still rank alike and most predictions hold.
    "int8": Gate(min_top1=0.9, min_mean_cosine=0.99, min_min_cosine=0.98),
}


# What ONNX Runtime raises for a graph it cannot run here, e.g. NOT_IMPLEMENTED for a kernel its
# CPU provider lacks at some type; bad inputs (InvalidArgument) are bugs and are not caught.
CANNOT_RUN = (
    ort_state.Fail, ort_state.NotImplemented, ort_state.RuntimeException, ort_state.InvalidGraph, ort_state.EPFail,
)  # fmt: skip


class NotRunnable(Exception):
    """A variant that ONNX Runtime cannot run on this machine (e.g. fp16 kernels missing on CPU)."""


@dataclass
class Sample:
    """One sample's main output (classes or features on the last axis) and its cosine vector."""

    main: np.ndarray
    vector: np.ndarray


class Validator:
    """Builds the sample inputs and the PyTorch reference once, then checks variants against it."""

    def __init__(
        self,
        spec: TaskSpec,
        checkpoint: Path,
        config: PretrainedConfig,
        tokenizer: PreTrainedTokenizerFast,
        pooling: int,
        max_length: int,
    ) -> None:
        self.spec = spec
        self.family = _FAMILIES[spec.name]
        self.pooling = pooling
        # Short samples: enough to exercise attention and padding, cheap on big models.
        self.batches = self.family.inputs(_Inputs(tokenizer, config, min(max_length, SAMPLE_MAX_LENGTH)))
        model_class = getattr(transformers, spec.auto_class)
        model = model_class.from_pretrained(checkpoint, dtype=torch.float32).eval()
        with torch.inference_mode():
            self.reference = [self._samples(self._run_torch(model, batch), batch) for batch in self.batches]

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
        return _judge(reference, [s for samples in exported for s in samples], self.family.logits, GATES[precision])

    def _run_torch(self, model: torch.nn.Module, batch: Batch) -> Outputs:
        arguments = {name: torch.from_numpy(array) for name, array in batch.items()}
        if self.spec.generative:
            arguments["use_cache"] = False
        result = model(**arguments)
        return {key: value.numpy() for key, value in result.items() if isinstance(value, torch.Tensor)}

    def _samples(self, outputs: Outputs, batch: Batch) -> list[Sample]:
        return self.family.samples(outputs, batch, self.pooling)


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


def _judge(reference: list[Sample], exported: list[Sample], logits: bool, gate: Gate) -> manifest_pb2.Validation:
    diffs = [float(np.abs(r.main - e.main).max()) for r, e in zip(reference, exported, strict=True)]
    scale = max(1.0, *(float(np.abs(r.main).max()) for r in reference))
    cosines = np.array([_cosine(r.vector, e.vector) for r, e in zip(reference, exported, strict=True)])
    validation = manifest_pb2.Validation(
        max_abs_diff=max(diffs),
        mean_cosine=float(cosines.mean()),
        min_cosine=float(cosines.min()),
        samples=len(reference),
    )
    max_diff = None if gate.max_abs_diff is None else gate.max_abs_diff * scale
    checks = [
        ("max_abs_diff", validation.max_abs_diff, "<=", max_diff),
        ("mean_cosine", validation.mean_cosine, ">=", gate.min_mean_cosine),
        ("min_cosine", validation.min_cosine, ">=", gate.min_min_cosine),
    ]
    if logits:
        agree = np.concatenate([_agreements(r.main, e.main) for r, e in zip(reference, exported, strict=True)])
        validation.top1_agreement = float(agree.mean())
        checks.append(("top1_agreement", validation.top1_agreement, ">=", gate.min_top1))
    for name, value, relation, bound in checks:
        if bound is not None and not (value <= bound if relation == "<=" else value >= bound):
            validation.failures.append(f"{name} {value:.6g} is not {relation} {bound:.6g}")
    validation.passed = not validation.failures
    return validation


def _agreements(reference: np.ndarray, exported: np.ndarray) -> np.ndarray:
    """Per top-1 prediction (rows over the last axis): whether the variant agrees, near-ties included."""
    reference = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
    chosen = exported.reshape(-1, exported.shape[-1]).argmax(-1)
    probabilities = np.exp(reference - reference.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    rows = np.arange(len(reference))
    return probabilities.max(-1) - probabilities[rows, chosen] < NEAR_TIE


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norms) if norms else float(np.array_equal(a, b))


# --- task families: their sample inputs, how the ONNX graphs run, and each sample's output ------


@dataclass(frozen=True)
class _Inputs:
    """What the sample inputs are made with."""

    tokenizer: PreTrainedTokenizerFast
    config: PretrainedConfig
    max_length: int

    def tokenize(self, *texts: Sequence[str]) -> Batch:
        encoded = self.tokenizer(*texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="np")
        return {name: array.astype(np.int64) for name, array in encoded.items()}


def _feeds(session: ort.InferenceSession, values: Batch) -> Batch:
    """The inputs the graph declares: from `values`, else empty past key values (the first step
    has no cache) and use_cache_branch=False for merged decoders."""
    batch_size = next(iter(values.values())).shape[0]
    feeds = {}
    for meta in session.get_inputs():
        if meta.name in values:
            feeds[meta.name] = values[meta.name]
        elif meta.name == "use_cache_branch":
            feeds[meta.name] = np.zeros([1], dtype=bool)
        else:  # past_key_values.*: [batch, heads, 0, head_dim]
            shape = [batch_size if i == 0 else dim if isinstance(dim, int) else 0 for i, dim in enumerate(meta.shape)]
            feeds[meta.name] = np.zeros(shape, dtype=np.float16 if "float16" in meta.type else np.float32)
    return feeds


def _run_single(sessions: dict[str, ort.InferenceSession], batch: Batch) -> Outputs:
    session = sessions["model"]
    names = [meta.name for meta in session.get_outputs()]
    return dict(zip(names, session.run(names, _feeds(session, batch)), strict=True))


def _run_seq2seq(sessions: dict[str, ort.InferenceSession], batch: Batch) -> Outputs:
    encoder, decoder = sessions["encoder"], sessions["decoder"]
    (hidden,) = encoder.run(["last_hidden_state"], _feeds(encoder, batch))
    values = {
        "input_ids": batch["decoder_input_ids"],
        "encoder_hidden_states": hidden,
        "encoder_attention_mask": batch["attention_mask"],
    }
    (logits,) = decoder.run(["logits"], _feeds(decoder, values))
    return {"logits": logits}


def _kept(array: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return array[mask.astype(bool)]


def _per_token(outputs: Outputs, batch: Batch, pooling: int) -> list[Sample]:
    masks = batch["attention_mask"]
    return [Sample(main, main.ravel()) for main in map(_kept, outputs["logits"], masks)]


def _per_sequence(outputs: Outputs, batch: Batch, pooling: int) -> list[Sample]:
    return [Sample(row, row.ravel()) for row in outputs["logits"]]


def _spans(outputs: Outputs, batch: Batch, pooling: int) -> list[Sample]:
    rows = zip(outputs["start_logits"], outputs["end_logits"], batch["attention_mask"], strict=True)
    return [Sample(main, main.ravel()) for main in (np.stack([_kept(s, m), _kept(e, m)]) for s, e, m in rows)]


def _embeddings(outputs: Outputs, batch: Batch, pooling: int) -> list[Sample]:
    samples = []
    for hidden, mask in zip(outputs["last_hidden_state"], batch["attention_mask"], strict=True):
        tokens = _kept(hidden, mask)
        if pooling == common_pb2.POOLING_CLS:
            pooled = hidden[0]
        elif pooling == common_pb2.POOLING_LAST_TOKEN:
            pooled = tokens[-1]
        else:
            pooled = tokens.mean(axis=0)
        samples.append(Sample(tokens, pooled))
    return samples


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
    batch = inputs.tokenize(list(TEXTS))
    start = inputs.config.decoder_start_token_id
    start = inputs.config.pad_token_id if start is None else start
    batch["decoder_input_ids"] = np.full([batch["input_ids"].shape[0], 1], start, dtype=np.int64)
    return [batch]


@dataclass(frozen=True)
class _Family:
    inputs: Callable[[_Inputs], list[Batch]]
    run_onnx: Callable[[dict[str, ort.InferenceSession], Batch], Outputs]
    samples: Callable[[Outputs, Batch, int], list[Sample]]
    logits: bool = True


_FAMILIES = {
    "feature-extraction": _Family(_texts, _run_single, _embeddings, logits=False),
    "text-classification": _Family(_texts_and_pairs, _run_single, _per_sequence),
    "token-classification": _Family(_texts, _run_single, _per_token),
    "question-answering": _Family(_questions, _run_single, _spans),
    "fill-mask": _Family(_masked_texts, _run_single, _per_token),
    "multiple-choice": _Family(_choices, _run_single, _per_sequence),
    "text2text-generation": _Family(_sources, _run_seq2seq, _per_sequence),
}
