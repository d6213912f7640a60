"""The fused decoder graph (docs/decoder-graph.md) decodes greedily as transformers' generate() does,
run either way the contract allows: feeding the past and reading a longer present back, or with one
buffer bound as both past and present. Batched rows (right-padded prompts, different lengths in
decode) give what each prompt gives alone. The tiny Gemma 3's sliding window (4) is shorter than
every prompt plus its new tokens."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from onnxserve.export.decoder_graph import build_decoder_graph, supports_fused_decoder
from onnxserve.server.runtime.sessions import Session, SessionSettings
from onnxserve.server.tasks.generation.fused import FusedBatch, FusedGraph
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config

from tests import generation_reference as reference

KINDS = ["llama-causal-lm", "gemma3-causal-lm", "qwen2-causal-lm"]
NEW_TOKENS = 12
MAX_LENGTH = 64


@pytest.fixture(scope="module")
def sessions(checkpoint: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Session]:
    built = {}
    for kind in KINDS:
        graph = tmp_path_factory.mktemp(kind) / "model.onnx"
        build_decoder_graph(AutoModelForCausalLM.from_pretrained(checkpoint(kind)), graph, max_length=MAX_LENGTH)
        built[kind] = Session(graph, SessionSettings())
    return built


def greedy_fed_back(session: Session, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy decoding with plain runs: each run's present (longer than the past it was fed) is
    the next run's past. Prompts right-padded, as the contract says."""
    runner = session.session
    pasts = [node for node in runner.get_inputs() if node.name.startswith("past_key_values.")]
    presents = [node.name.replace("past_key_values.", "present.") for node in pasts]
    cache = {node.name: np.zeros((len(prompts), node.shape[1], 0, node.shape[3]), np.float32) for node in pasts}
    lengths = np.array([len(prompt) for prompt in prompts], dtype=np.int32)  # in the cache after the run
    input_ids = np.zeros((len(prompts), lengths.max()), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        input_ids[row, : len(prompt)] = prompt
    generated = []
    for _ in range(new_tokens):
        total = np.array(lengths.max(), dtype=np.int32)
        feed = {"input_ids": input_ids, "seqlens_k": lengths - 1, "total_sequence_length": total, **cache}
        logits, *values = runner.run(["logits", *presents], feed)
        cache = dict(zip(cache, values, strict=True))
        generated.append(logits[:, 0].argmax(axis=-1))
        input_ids, lengths = generated[-1][:, None].astype(np.int64), lengths + 1
    return np.stack(generated, axis=1).tolist()


def greedy_shared_buffer(session: Session, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy decoding with the serving side's step batch: one buffer bound as past and present."""
    batch = FusedBatch(FusedGraph(session), rows=len(prompts), length=max(map(len, prompts)) + new_tokens)
    generated = [batch.prefill(0, prompts).argmax(axis=-1)]
    while len(generated) < new_tokens:
        generated.append(batch.decode(generated[-1]).argmax(axis=-1))
    return np.stack(generated, axis=1).tolist()


GREEDY = {"fed-back": greedy_fed_back, "shared-buffer": greedy_shared_buffer}


def _cut_at_eos(checkpoint: Path, ids: list[int]) -> list[int]:
    """As generation_reference cuts generate()'s output: after the first EOS."""
    ends = set(reference.eos_ids(checkpoint, seq2seq=False))
    return ids[: next((index + 1 for index, token in enumerate(ids) if token in ends), len(ids))]


def _prompt_ids(checkpoint: Path) -> list[list[int]]:
    return [reference.tokenizer(checkpoint)(prompt).input_ids for prompt in reference.PROMPTS]


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_ids_equal_generate_alone(
    kind: str, checkpoint: Callable[[str], Path], sessions: dict[str, Session]
) -> None:
    path = checkpoint(kind)
    for prompt, ids in zip(reference.PROMPTS, _prompt_ids(path), strict=True):
        expected = reference.generate_ids(path, [prompt], max_new_tokens=NEW_TOKENS, do_sample=False)[0]
        for mode, greedy in GREEDY.items():
            (generated,) = greedy(sessions[kind], [ids], NEW_TOKENS)
            assert _cut_at_eos(path, generated) == expected, (prompt, mode)


@pytest.mark.parametrize("mode", GREEDY)
@pytest.mark.parametrize("kind", KINDS)
def test_batched_rows_equal_alone(
    kind: str, mode: str, checkpoint: Callable[[str], Path], sessions: dict[str, Session]
) -> None:
    path = checkpoint(kind)
    prompts = _prompt_ids(path)
    assert len({len(ids) for ids in prompts}) == len(prompts)  # every row pads differently
    batched = GREEDY[mode](sessions[kind], prompts, NEW_TOKENS)
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
