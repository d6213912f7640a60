"""A request's decoding options, checked and completed with the checkpoint's defaults.

Unset fields take generation_config.json's value (carried in the manifest's GenerationDefaults),
then the defaults the contract names; every refusal names the field."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from onnxserve.server.errors import InvalidArgument

from onnxserve.v1 import inference_pb2, manifest_pb2

DEFAULT_MAX_NEW_TOKENS = 20
# Every beam is a row of the decoding batch with a cache of its own, so the bound keeps what one
# request may allocate in proportion to the model (an unbounded count took the server's memory).
MAX_NUM_BEAMS = 64
MAX_SEQUENCES = 256  # prompts x beams of one request: each is a row with its own cache


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    seed: int
    repetition_penalty: float
    stop: tuple[str, ...]
    return_full_text: bool
    num_beams: int
    length_penalty: float
    early_stopping: bool
    no_repeat_ngram_size: int


def _get(message: inference_pb2.GenerationParameters, name: str, default: float | None) -> float | None:
    return getattr(message, name) if message.HasField(name) else default


def _defaults(defaults: manifest_pb2.GenerationDefaults, name: str, fallback: float) -> float:
    return getattr(defaults, name) if defaults.HasField(name) else fallback


def resolve_settings(
    parameters: inference_pb2.GenerationParameters, defaults: manifest_pb2.GenerationDefaults, room: int
) -> GenerationSettings:
    """`room` is how many tokens the model can still generate after the longest prompt."""
    p, d = parameters, defaults
    temperature = _get(p, "temperature", 1.0)
    top_p = _get(p, "top_p", 1.0)
    num_beams = int(_get(p, "num_beams", _defaults(d, "num_beams", 1)))
    repetition_penalty = _get(p, "repetition_penalty", 1.0)
    _require(not (temperature < 0 or math.isnan(temperature)), f"temperature must be >= 0, got {temperature}")
    _require(0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}")
    _require(num_beams >= 1, f"num_beams must be at least 1, got {num_beams}")
    _require(num_beams <= MAX_NUM_BEAMS, f"num_beams is {num_beams}, over the server's limit of {MAX_NUM_BEAMS}")
    _require(repetition_penalty > 0, f"repetition_penalty must be > 0, got {repetition_penalty}")
    _require(all(p.stop), "stop holds an empty string: every stop sequence needs at least one character")
    return GenerationSettings(
        max_new_tokens=_max_new_tokens(p, d, room),
        # Temperature 0 is the limit of sampling: greedy.
        do_sample=p.do_sample and temperature > 0,
        temperature=temperature,
        top_k=int(_get(p, "top_k", 0)),
        top_p=top_p,
        seed=int(_get(p, "seed", int.from_bytes(os.urandom(8), "little"))),
        repetition_penalty=repetition_penalty,
        stop=tuple(p.stop),
        return_full_text=p.return_full_text,
        num_beams=num_beams,
        length_penalty=_get(p, "length_penalty", _defaults(d, "length_penalty", 1.0)),
        early_stopping=bool(_get(p, "early_stopping", _defaults(d, "early_stopping", False))),
        no_repeat_ngram_size=int(_get(p, "no_repeat_ngram_size", _defaults(d, "no_repeat_ngram_size", 0))),
    )


def _max_new_tokens(
    parameters: inference_pb2.GenerationParameters, defaults: manifest_pb2.GenerationDefaults, room: int
) -> int:
    if not parameters.HasField("max_new_tokens"):
        # The default fits itself to the prompt rather than refusing it.
        return max(1, min(int(_defaults(defaults, "default_max_new_tokens", DEFAULT_MAX_NEW_TOKENS)), room))
    wanted = parameters.max_new_tokens
    _require(wanted >= 1, f"max_new_tokens must be at least 1, got {wanted}")
    _require(
        wanted <= room,
        f"max_new_tokens is {wanted}, over the model's limit: it can generate at most {room} more tokens "
        "after the longest prompt",
    )
    return wanted


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidArgument(message)
