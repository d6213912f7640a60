"""The quality gate of a text-generation export: the variant's own greedy decoding and perplexity
against PyTorch fp32.

For each prompt of PROMPTS, PyTorch's greedy `generate()` gives the reference continuation of
`new_tokens` tokens (fewer where it ends with EOS); the variant decodes greedily through the
serving code's step model (`open_causal_model`, so whichever graph layout the export made) on the
device `validation_device` names, and the figure is the length of the common prefix. Perplexity is
measured on TEXT, fed to the variant one token at a time (the fused graph returns only the last
position's logits), against PyTorch's perplexity on the same tokens in one forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from onnxserve.export.validate import CANNOT_RUN, NotRunnable, validation_device
from onnxserve.server.errors import ModelLoadError
from onnxserve.server.quality.gates import BOUNDS, GGUF_BOUNDS, Bounds, judge_generation
from onnxserve.server.quality.probes import GenerationProbes, truncated
from onnxserve.server.quality.runs import common_prefix, greedy, perplexity, step_perplexity
from onnxserve.server.runtime.sessions import Session, SessionSettings
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

from onnxserve.v1 import manifest_pb2

# Several languages and registers, code included: quantization errors show first off English prose.
PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "Les plus beaux endroits de Paris sont",
    "Three tips for staying healthy are",
    "我最喜欢的季节是",
)
TEXT = (
    "Water covers most of the surface of the Earth. The sun warms the oceans, and some of the water "
    "rises into the air as vapour. High above the ground the vapour cools and forms clouds, which the "
    "wind carries over the land. When the drops in a cloud grow heavy enough, they fall as rain or "
    "snow. Rivers gather the water again and bring it back to the sea, and the cycle begins once more."
)


@dataclass(frozen=True)
class GenerativeGate:
    """The gate's settings: new tokens per prompt, and the bounds per precision (tiny test models,
    whose logits are nearly tied, pass their own)."""

    new_tokens: int = 64
    bounds: Mapping[str, Bounds] = field(default_factory=lambda: BOUNDS)


DEFAULT_GATE = GenerativeGate()
#: The default gate of an export from a GGUF, whose weight-only variants are the file's blocks.
GGUF_GATE = GenerativeGate(bounds=GGUF_BOUNDS)


@dataclass(frozen=True)
class _Reference:
    prompts: list[list[int]]
    continuations: list[list[int]]
    text: list[int]
    perplexity: float


class GenerativeValidator:
    """Computes PyTorch's continuations and perplexity once, then checks variants against them."""

    def __init__(
        self,
        checkpoint: Path,
        tokenizer: PreTrainedTokenizerFast,
        generation: GenerationConfig,
        gate: GenerativeGate,
        max_length: int,
    ) -> None:
        """`max_length`: the longest sequence the model takes, which the perplexity text is cut to."""
        self.gate = gate
        self.pad_token_id = generation.pad_token_id if generation.pad_token_id is not None else 0
        eos = generation.eos_token_id
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else eos or ())
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        prompts = [tokenizer(prompt)["input_ids"] for prompt in PROMPTS]
        text = tokenizer(TEXT, truncation=True, max_length=max_length)["input_ids"]
        with torch.inference_mode():
            continuations = [self._torch_greedy(model, prompt, generation) for prompt in prompts]
            logits = model(torch.tensor([text])).logits[0].numpy()
        self.reference = _Reference(prompts, continuations, text, perplexity(logits, text))

    def _torch_greedy(self, model: torch.nn.Module, prompt: list[int], generation: GenerationConfig) -> list[int]:
        # Plain greedy, without the checkpoint's repetition penalty or banned tokens: the gate
        # compares the graphs, not decoding settings.
        settings = GenerationConfig(
            do_sample=False,
            max_new_tokens=self.gate.new_tokens,
            eos_token_id=sorted(self.eos_token_ids) or None,
            pad_token_id=self.pad_token_id,
            bos_token_id=generation.bos_token_id,
        )
        ids = torch.tensor([prompt])
        output = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=settings)
        return _until_eos(output[0, len(prompt) :].tolist(), self.eos_token_ids)

    def validate(self, graphs: dict[str, Path], precision: str) -> manifest_pb2.Validation:
        """The variant's figures and its gate's verdict; NotRunnable if ONNX Runtime cannot run it here."""
        reference, new_tokens = self.reference, self.gate.new_tokens
        device = validation_device(precision)
        try:
            session = Session(graphs["model"], SessionSettings(device=device))
            agreement = [
                common_prefix(greedy(session, prompt, new_tokens, self.eos_token_ids, self.pad_token_id), expected)
                for prompt, expected in zip(reference.prompts, reference.continuations, strict=True)
            ]
            variant_perplexity = step_perplexity(session, reference.text, self.pad_token_id)
        except (ModelLoadError, *CANNOT_RUN) as error:
            raise NotRunnable(f"ONNX Runtime cannot run it on the {device}: {error}") from error
        lengths = [len(expected) for expected in reference.continuations]
        bounds = self.gate.bounds[precision]
        # The probes need no run of their own here: their continuations are prefixes of these and
        # their text is this one, so a variant that passes this gate passes them on these kernels.
        return judge_generation(agreement, lengths, variant_perplexity, reference.perplexity, bounds)

    def probes(self) -> GenerationProbes:
        """What the server checks each variant on at load: the first prompts' continuations,
        shortened, and the perplexity text, under this gate's bounds."""
        reference = self.reference
        return GenerationProbes(
            prompts=reference.prompts,
            continuations=truncated(reference.continuations),
            text=reference.text,
            reference_perplexity=reference.perplexity,
            eos_token_ids=sorted(self.eos_token_ids),
            pad_token_id=self.pad_token_id,
            bounds=dict(self.gate.bounds),
        )


def _until_eos(tokens: list[int], eos_token_ids: frozenset[int]) -> list[int]:
    end = next((index + 1 for index, token in enumerate(tokens) if token in eos_token_ids), len(tokens))
    return tokens[:end]
