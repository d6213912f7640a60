"""A CTranslate2 Whisper model (faster-whisper's `model.bin`, with its `config.json` and
`tokenizer.json` beside it) read into a transformers WhisperForConditionalGeneration checkpoint,
as the GGUF path does for Gemma, so that `onnxserve export model.bin` exports it like any
checkpoint.

model.bin (CTranslate2's python/ctranslate2/specs/model_spec.py, `_serialize`): a uint32 binary
version, the spec's name and a uint32 revision, then each variable as its name, uint8 rank,
uint32 dims, uint8 dtype id and uint32 byte count before its bytes, then (name, target) aliases;
strings are a uint16 length (with the trailing NUL) and the bytes. The converter fuses attention
projections (`converters/transformers.py`, BartLoader.set_attention): self-attention's q, k and v
rows are one matrix, cross-attention's k and v another; Whisper's k has no bias, so the fused bias
holds zeros there. The output projection is an alias of the token embeddings."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from onnxserve.export.errors import ExportError

# CTranslate2's type ids, in its order (model_spec._dtype_to_type_id); bfloat16 is read as raw
# uint16 and widened below.
_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_SUPPORTED_BINARY_VERSIONS = (5, 6)
_WHISPER_SPEC = "WhisperSpec"
# Tokens of a multilingual Whisper vocabulary that are neither languages nor timestamps.
_TASKS = {"transcribe": "<|transcribe|>", "translate": "<|translate|>"}
_START = "<|startoftranscript|>"
_END = "<|endoftext|>"
_NO_TIMESTAMPS = "<|notimestamps|>"
_PREVIOUS = "<|startofprev|>"
# openai/whisper's max_initial_timestamp (1 s) in 0.02 s steps, as its Hub generation configs carry it.
_MAX_INITIAL_TIMESTAMP_INDEX = 50


class _Reader:
    """Sequential little-endian reads over the file's bytes."""

    def __init__(self, data: bytes) -> None:
        self.data, self.position = data, 0

    def number(self, kind: str) -> int:
        (value,) = struct.unpack_from("<" + kind, self.data, self.position)
        self.position += struct.calcsize(kind)
        return value

    def string(self) -> str:
        length = self.number("H")
        text = self.data[self.position : self.position + length - 1].decode("utf-8")
        self.position += length
        return text

    def array(self, dtype: str, shape: list[int], size: int) -> np.ndarray:
        stored = np.uint16 if dtype == "bfloat16" else np.dtype(dtype)
        values = np.frombuffer(self.data, dtype=stored, count=size // np.dtype(stored).itemsize, offset=self.position)
        self.position += size
        if dtype == "bfloat16":  # the upper half of a float32
            values = (values.astype(np.uint32) << 16).view(np.float32)
        return values.reshape(shape)


def read_model_bin(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    """The spec's name and every variable of a CTranslate2 model.bin by name, aliases resolved."""
    try:
        reader = _Reader(path.read_bytes())
        version = reader.number("I")
        if version not in _SUPPORTED_BINARY_VERSIONS:
            raise ExportError(f"{path} is CTranslate2 binary version {version}; this reader knows 5 and 6")
        spec = reader.string()
        reader.number("I")  # the spec's revision
        variables = {}
        for _ in range(reader.number("I")):
            name = reader.string()
            shape = [reader.number("I") for _ in range(reader.number("B"))]
            dtype = _DTYPES[reader.number("B")]
            variables[name] = reader.array(dtype, shape, reader.number("I"))
        for _ in range(reader.number("I")):
            alias, target = reader.string(), reader.string()
            variables[alias] = variables[target]
    except (struct.error, IndexError, ValueError, UnicodeDecodeError) as error:
        raise ExportError(f"{path} is not a readable CTranslate2 model.bin (truncated or corrupt: {error})") from error
    if reader.position != len(reader.data):
        raise ExportError(f"{path} has {len(reader.data) - reader.position} bytes after its last entry: corrupt")
    return spec, variables


@dataclass(frozen=True)
class _Sizes:
    """The architecture, read off the variables' shapes."""

    d_model: int
    vocab_size: int
    num_mel_bins: int
    encoder_layers: int
    decoder_layers: int
    encoder_heads: int
    decoder_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    max_source_positions: int
    max_target_positions: int


def _count_layers(variables: dict[str, np.ndarray], stack: str) -> int:
    return sum(1 for name in variables if name.startswith(f"{stack}/layer_") and name.endswith("ffn/linear_0/weight"))


def _sizes(variables: dict[str, np.ndarray]) -> _Sizes:
    embeddings = variables["decoder/embeddings/weight"]
    return _Sizes(
        d_model=embeddings.shape[1],
        vocab_size=embeddings.shape[0],
        num_mel_bins=variables["encoder/conv1/weight"].shape[1],
        encoder_layers=_count_layers(variables, "encoder"),
        decoder_layers=_count_layers(variables, "decoder"),
        encoder_heads=int(variables["encoder/num_heads"]),
        decoder_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
    )


def _linear(variables: dict[str, np.ndarray], source: str, target: str) -> Iterator[tuple[str, np.ndarray]]:
    yield f"{target}.weight", variables[f"{source}/weight"]
    if f"{source}/bias" in variables:
        yield f"{target}.bias", variables[f"{source}/bias"]


def _layer_norm(variables: dict[str, np.ndarray], source: str, target: str) -> Iterator[tuple[str, np.ndarray]]:
    yield f"{target}.weight", variables[f"{source}/gamma"]
    yield f"{target}.bias", variables[f"{source}/beta"]


def _split(
    variables: dict[str, np.ndarray], source: str, target: str, projections: tuple[str, ...]
) -> Iterator[tuple[str, np.ndarray]]:
    """A fused projection cut back into its q/k/v parts; k_proj gets no bias, as in Whisper."""
    weights = np.split(variables[f"{source}/weight"], len(projections))
    biases = np.split(variables[f"{source}/bias"], len(projections))
    for projection, weight, bias in zip(projections, weights, biases, strict=True):
        yield f"{target}.{projection}.weight", weight
        if projection != "k_proj":
            yield f"{target}.{projection}.bias", bias


def _layer(variables: dict[str, np.ndarray], stack: str, index: int) -> Iterator[tuple[str, np.ndarray]]:
    source, target = f"{stack}/layer_{index}", f"model.{stack}.layers.{index}"
    yield from _split(
        variables, f"{source}/self_attention/linear_0", f"{target}.self_attn", ("q_proj", "k_proj", "v_proj")
    )
    yield from _linear(variables, f"{source}/self_attention/linear_1", f"{target}.self_attn.out_proj")
    yield from _layer_norm(variables, f"{source}/self_attention/layer_norm", f"{target}.self_attn_layer_norm")
    if stack == "decoder":
        cross = f"{target}.encoder_attn"
        yield from _linear(variables, f"{source}/attention/linear_0", f"{cross}.q_proj")
        yield from _split(variables, f"{source}/attention/linear_1", cross, ("k_proj", "v_proj"))
        yield from _linear(variables, f"{source}/attention/linear_2", f"{cross}.out_proj")
        yield from _layer_norm(variables, f"{source}/attention/layer_norm", f"{target}.encoder_attn_layer_norm")
    yield from _linear(variables, f"{source}/ffn/linear_0", f"{target}.fc1")
    yield from _linear(variables, f"{source}/ffn/linear_1", f"{target}.fc2")
    yield from _layer_norm(variables, f"{source}/ffn/layer_norm", f"{target}.final_layer_norm")


def whisper_state_dict(variables: dict[str, np.ndarray], sizes: _Sizes) -> dict[str, np.ndarray]:
    """The WhisperForConditionalGeneration parameters (float32) from a WhisperSpec's variables."""
    state: dict[str, np.ndarray] = {}
    for stack in ("encoder", "decoder"):
        state[f"model.{stack}.embed_positions.weight"] = variables[f"{stack}/position_encodings/encodings"]
        state.update(_layer_norm(variables, f"{stack}/layer_norm", f"model.{stack}.layer_norm"))
        layers = sizes.encoder_layers if stack == "encoder" else sizes.decoder_layers
        for index in range(layers):
            state.update(_layer(variables, stack, index))
    for conv in ("conv1", "conv2"):
        state.update(_linear(variables, f"encoder/{conv}", f"model.encoder.{conv}"))
    state["model.decoder.embed_tokens.weight"] = variables["decoder/embeddings/weight"]
    state["proj_out.weight"] = variables["decoder/projection/weight"]
    return {name: np.asarray(value, dtype=np.float32) for name, value in state.items()}


def _token_ids(tokenizer_json: dict[str, Any]) -> dict[str, int]:
    return {token["content"]: token["id"] for token in tokenizer_json["added_tokens"]}


def whisper_configs(sizes: _Sizes, ct2_config: dict[str, Any], tokenizer_json: dict[str, Any]) -> tuple[Any, Any]:
    """transformers' WhisperConfig and GenerationConfig: sizes from the weights, special ids from
    the tokenizer, suppressed tokens, language ids and alignment heads from CTranslate2's
    config.json (what the converter copied from the original generation config)."""
    from transformers import GenerationConfig, WhisperConfig

    ids = _token_ids(tokenizer_json)
    missing = [token for token in (_START, _END, _NO_TIMESTAMPS) if token not in ids]
    if missing:
        raise ExportError(f"tokenizer.json lacks Whisper's special tokens {', '.join(missing)}")
    names = {token_id: token for token, token_id in ids.items()}
    languages = {names[token_id]: token_id for token_id in ct2_config.get("lang_ids", [])}
    end, start = ids[_END], ids[_START]
    config = WhisperConfig(
        vocab_size=sizes.vocab_size,
        num_mel_bins=sizes.num_mel_bins,
        d_model=sizes.d_model,
        encoder_layers=sizes.encoder_layers,
        decoder_layers=sizes.decoder_layers,
        encoder_attention_heads=sizes.encoder_heads,
        decoder_attention_heads=sizes.decoder_heads,
        encoder_ffn_dim=sizes.encoder_ffn_dim,
        decoder_ffn_dim=sizes.decoder_ffn_dim,
        max_source_positions=sizes.max_source_positions,
        max_target_positions=sizes.max_target_positions,
        bos_token_id=end,
        eos_token_id=end,
        pad_token_id=end,
        decoder_start_token_id=start,
        architectures=["WhisperForConditionalGeneration"],
    )
    generation = GenerationConfig(
        bos_token_id=end,
        eos_token_id=end,
        pad_token_id=end,
        decoder_start_token_id=start,
        max_length=sizes.max_target_positions,
        suppress_tokens=ct2_config.get("suppress_ids", []),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin", []),
        no_timestamps_token_id=ids[_NO_TIMESTAMPS],
        prev_sot_token_id=ids.get(_PREVIOUS),
        is_multilingual=bool(languages),
        lang_to_id=languages,
        task_to_id={task: ids[token] for task, token in _TASKS.items() if token in ids and languages},
        alignment_heads=[list(head) for head in ct2_config.get("alignment_heads", [])],
        max_initial_timestamp_index=_MAX_INITIAL_TIMESTAMP_INDEX,
        # As OpenAI's checkpoints on the Hub: the language left to detection, the task transcribe
        # (without it, generate() detects the language and then decodes with no task token).
        forced_decoder_ids=[[1, None], [2, ids["<|transcribe|>"]]] if languages else None,
        return_timestamps=False,
    )
    return config, generation


def convert_whisper(model_bin: Path, target: Path) -> None:
    """Writes the transformers checkpoint of MODEL_BIN (whose folder holds config.json and
    tokenizer.json) into TARGET: weights, configs, tokenizer and feature extractor."""
    import torch
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizerFast

    folder = model_bin.parent
    for needed in ("config.json", "tokenizer.json"):
        if not (folder / needed).is_file():
            raise ExportError(f"{folder} has no {needed} beside {model_bin.name}: a CTranslate2 model folder has both")
    spec, variables = read_model_bin(model_bin)
    if spec != _WHISPER_SPEC:
        raise ExportError(f"{model_bin} holds a CTranslate2 {spec}; the reader converts {_WHISPER_SPEC} models only")
    sizes = _sizes(variables)
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    ct2_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config, generation = whisper_configs(sizes, ct2_config, tokenizer_json)
    model = WhisperForConditionalGeneration(config)
    state = {name: torch.from_numpy(value) for name, value in whisper_state_dict(variables, sizes).items()}
    model.load_state_dict(state, strict=True)
    model.generation_config = generation
    model.save_pretrained(target)
    # Whisper's timestamp ids start after the last special token (its tokenizer's timestamp_begin),
    # so every special token must be one here, not only <|endoftext|>.
    specials = [token["content"] for token in tokenizer_json["added_tokens"] if token["special"]]
    tokenizer = WhisperTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        additional_special_tokens=[token for token in specials if token != _END],
    )
    tokenizer.model_max_length = sizes.max_target_positions
    tokenizer.save_pretrained(target)
    WhisperFeatureExtractor(feature_size=sizes.num_mel_bins).save_pretrained(target)
