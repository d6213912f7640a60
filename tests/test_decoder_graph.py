"""The fused decoder graph (docs/decoder-graph.md) decodes greedily as transformers' generate() does,
run either way the contract allows: feeding the past and reading a longer present back, or with one
buffer bound as both past and present. Batched rows (right-padded prompts, different lengths in
decode) give what each prompt gives alone. The tiny Gemma 3's sliding window (4) is shorter than
every prompt plus its new tokens."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnxserve.export.decoder_graph import build_decoder_graph, supports_fused_decoder
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config

from tests import generation_reference as reference

KINDS = ["llama-causal-lm", "gemma3-causal-lm", "qwen2-causal-lm"]
NEW_TOKENS = 12
MAX_LENGTH = 64


@pytest.fixture(scope="module")
def sessions(
    checkpoint: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, ort.InferenceSession]:
    built = {}
    for kind in KINDS:
        graph = tmp_path_factory.mktemp(kind) / "model.onnx"
        build_decoder_graph(AutoModelForCausalLM.from_pretrained(checkpoint(kind)), graph, max_length=MAX_LENGTH)
        built[kind] = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    return built


class Greedy:
    """Greedy decoding over the fused graph, with the cache fed back (`shared` False: present comes
    back longer than the past fed) or in one buffer bound as both past and present."""

    def __init__(self, session: ort.InferenceSession, shared: bool) -> None:
        self.session = session
        self.shared = shared
        self.past = [node for node in session.get_inputs() if node.name.startswith("past_key_values.")]

    def __call__(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        lengths = np.array([len(prompt) for prompt in prompts], dtype=np.int32)
        input_ids = np.zeros((len(prompts), lengths.max()), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            input_ids[row, : len(prompt)] = prompt  # right-padded
        cache = self._empty_cache(len(prompts), int(lengths.max()) + new_tokens)
        generated = []
        for _ in range(new_tokens):
            logits, cache = self._run(input_ids, lengths, cache)
            tokens = logits[:, 0].argmax(axis=-1)
            generated.append(tokens)
            input_ids, lengths = tokens[:, None].astype(np.int64), lengths + 1
        return np.stack(generated, axis=1).tolist()

    def _empty_cache(self, rows: int, length: int) -> dict[str, np.ndarray]:
        size = length if self.shared else 0
        return {node.name: np.zeros((rows, node.shape[1], size, node.shape[3]), np.float32) for node in self.past}

    def _run(
        self, input_ids: np.ndarray, lengths: np.ndarray, cache: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One run: `lengths` is each row's token count in the cache once this run is done."""
        inputs = {
            "input_ids": input_ids,
            "seqlens_k": (lengths - 1).astype(np.int32),
            "total_sequence_length": np.array(lengths.max(), dtype=np.int32),
        }
        if not self.shared:
            logits, *presents = self.session.run(None, {**inputs, **cache})
            names = [node.name.replace("present.", "past_key_values.") for node in self.session.get_outputs()[1:]]
            return logits, dict(zip(names, presents, strict=True))
        binding = self.session.io_binding()
        for name, value in inputs.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output("logits")
        for name, buffer in cache.items():
            value = ort.OrtValue.ortvalue_from_numpy(buffer)  # wraps the array: writes land in it
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(name.replace("past_key_values.", "present."), value)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy(), cache


def _cut_at_eos(checkpoint: Path, ids: list[int]) -> list[int]:
    """As generation_reference cuts generate()'s output: after the first EOS."""
    ends = set(reference.eos_ids(checkpoint, seq2seq=False))
    return ids[: next((index + 1 for index, token in enumerate(ids) if token in ends), len(ids))]


def _prompt_ids(checkpoint: Path) -> list[list[int]]:
    return [reference.tokenizer(checkpoint)(prompt).input_ids for prompt in reference.PROMPTS]


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_ids_equal_generate_alone(
    kind: str, checkpoint: Callable[[str], Path], sessions: dict[str, ort.InferenceSession]
) -> None:
    path = checkpoint(kind)
    for prompt, ids in zip(reference.PROMPTS, _prompt_ids(path), strict=True):
        expected = reference.generate_ids(path, [prompt], max_new_tokens=NEW_TOKENS, do_sample=False)[0]
        for shared in (False, True):
            (generated,) = Greedy(sessions[kind], shared)([ids], NEW_TOKENS)
            assert _cut_at_eos(path, generated) == expected, (prompt, shared)


@pytest.mark.parametrize("shared", [False, True], ids=["fed-back", "shared-buffer"])
@pytest.mark.parametrize("kind", KINDS)
def test_batched_rows_equal_alone(
    kind: str, shared: bool, checkpoint: Callable[[str], Path], sessions: dict[str, ort.InferenceSession]
) -> None:
    path = checkpoint(kind)
    prompts = _prompt_ids(path)
    assert len({len(ids) for ids in prompts}) == len(prompts)  # every row pads differently
    batched = Greedy(sessions[kind], shared)(prompts, NEW_TOKENS)
    for prompt, generated in zip(reference.PROMPTS, batched, strict=True):
        expected = reference.generate_ids(path, [prompt], max_new_tokens=NEW_TOKENS, do_sample=False)[0]
        assert _cut_at_eos(path, generated) == expected, prompt


def test_prompts_cross_the_sliding_window(checkpoint: Callable[[str], Path]) -> None:
    path = checkpoint("gemma3-causal-lm")
    window = AutoConfig.from_pretrained(path).sliding_window
    assert min(len(ids) for ids in _prompt_ids(path)) < window < max(len(ids) for ids in _prompt_ids(path))


def test_which_architectures_are_fused(checkpoint: Callable[[str], Path]) -> None:
    for kind in KINDS:
        assert supports_fused_decoder(AutoConfig.from_pretrained(checkpoint(kind))), kind
    assert not supports_fused_decoder(GPT2Config())
