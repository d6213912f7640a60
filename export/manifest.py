"""The manifest fields that describe the model itself, read from its config, tokenizer,
generation config and sentence-transformers settings."""

from __future__ import annotations

import importlib.metadata
from datetime import datetime, timezone
from pathlib import Path

import onnxruntime
from onnxserve.export.checkpoint import Checkpoint, pooling, sentence_transformers_max_length
from onnxserve.export.tasks import TaskSpec
from transformers import GenerationConfig, PretrainedConfig, PreTrainedTokenizerFast

from onnxserve.repository import MANIFEST_FORMAT_VERSION
from onnxserve.v1 import common_pb2, manifest_pb2

FALLBACK_MAX_LENGTH = 512  # when neither the tokenizer nor the config bounds the input
# transformers' "no limit" placeholder for model_max_length is int(1e30); nothing real is this long.
_UNBOUNDED = 10**9
# RoBERTa-style embeddings number positions from padding_idx + 1, so two of the
# max_position_embeddings rows are never reachable by a token.
_POSITION_OFFSET = {
    "roberta": 2, "xlm-roberta": 2, "xlm-roberta-xl": 2, "camembert": 2, "longformer": 2,
    "data2vec-text": 2, "roberta-prelayernorm": 2, "ibert": 2, "mpnet": 2,
}  # fmt: skip
_CLASS_LABELS = (
    common_pb2.TASK_TEXT_CLASSIFICATION, common_pb2.TASK_TOKEN_CLASSIFICATION, common_pb2.TASK_IMAGE_CLASSIFICATION,
    common_pb2.TASK_OBJECT_DETECTION, common_pb2.TASK_IMAGE_SEGMENTATION, common_pb2.TASK_AUDIO_CLASSIFICATION,
)  # fmt: skip
_SPECIAL_TOKENS = ("cls_token", "sep_token", "pad_token", "mask_token", "unk_token", "bos_token", "eos_token")
_LIBRARIES = ("torch", "transformers", "optimum", "optimum-onnx", "onnx")


def describe_model(
    checkpoint: Checkpoint,
    spec: TaskSpec,
    config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerFast | None,
    generation: GenerationConfig | None,
    image_processing: manifest_pb2.ImageProcessing | None = None,
) -> manifest_pb2.Manifest:
    """A manifest with every field except the name, version, variants, opset and time. Vision
    models have no tokenizer, and their image processing instead."""
    manifest = manifest_pb2.Manifest(
        format_version=MANIFEST_FORMAT_VERSION,
        task=spec.proto,
        source=checkpoint.source,
        architecture=(config.architectures or [""])[0],
        model_type=config.model_type,
        pooling=pooling(checkpoint.path),
        hidden_size=getattr(config, "hidden_size", None) or 0,
        multi_label=config.problem_type == "multi_label_classification",
        library_versions=library_versions(),
    )
    if spec.proto in _CLASS_LABELS:
        manifest.labels.extend(config.id2label[i] for i in range(config.num_labels))
    if image_processing is not None:
        manifest.image_processing.CopyFrom(image_processing)
    if tokenizer is None:
        return manifest
    manifest.max_length = max_length(checkpoint.path, config, tokenizer)
    manifest.clean_up_tokenization_spaces = bool(tokenizer.clean_up_tokenization_spaces)
    eos_ids = _eos_ids(config, generation)
    manifest.special_tokens.CopyFrom(special_tokens(tokenizer, eos_ids))
    if generation is not None:
        context = _positions(config) or manifest.max_length
        manifest.generation.CopyFrom(generation_defaults(config, generation, tokenizer, eos_ids, context))
    return manifest


def max_length(checkpoint: Path, config: PretrainedConfig, tokenizer: PreTrainedTokenizerFast) -> int:
    """The longest input: the tightest of the tokenizer's model_max_length, the position
    embeddings, and sentence-transformers' max_seq_length (what the embeddings were trained at)."""
    limits = [
        tokenizer.model_max_length if tokenizer.model_max_length < _UNBOUNDED else None,
        _positions(config),
        sentence_transformers_max_length(checkpoint),
    ]
    return min((limit for limit in limits if limit), default=FALLBACK_MAX_LENGTH)


def _text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The config of the model's text side: CLIP's text tower, a VisionEncoderDecoder's decoder,
    else the config itself."""
    return getattr(config, "text_config", None) or getattr(config, "decoder", None) or config


def _positions(config: PretrainedConfig) -> int | None:
    """The decoder's (or encoder's) position count; speech seq2seq configs (Whisper, Speech2Text)
    name their decoder's max_target_positions."""
    text = _text_config(config)
    positions = getattr(text, "max_position_embeddings", None) or getattr(text, "max_target_positions", None)
    return positions - _POSITION_OFFSET.get(config.model_type, 0) if positions else None


def _eos_ids(config: PretrainedConfig, generation: GenerationConfig | None) -> list[int]:
    eos = generation.eos_token_id if generation is not None else None
    if eos is None:
        eos = config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def special_tokens(tokenizer: PreTrainedTokenizerFast, eos_ids: list[int]) -> manifest_pb2.SpecialTokens:
    tokens = tokenizer.special_tokens_map  # unlike tokenizer.cls_token, silent about unset tokens
    return manifest_pb2.SpecialTokens(
        **{name: str(tokens.get(name, "")) for name in _SPECIAL_TOKENS},
        pad_token_id=_pad_token_id(tokenizer, eos_ids),
        padding_side=tokenizer.padding_side,
    )


def _pad_token_id(tokenizer: PreTrainedTokenizerFast, eos_ids: list[int]) -> int:
    # Tokenizers without a pad token (GPT-2, Llama) pad with end-of-sequence, as transformers'
    # generation does; padded positions are masked out either way.
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return eos_ids[0] if eos_ids else 0


def generation_defaults(
    config: PretrainedConfig,
    generation: GenerationConfig,
    tokenizer: PreTrainedTokenizerFast,
    eos_ids: list[int],
    context_length: int,
) -> manifest_pb2.GenerationDefaults:
    defaults = manifest_pb2.GenerationDefaults(
        eos_token_ids=eos_ids,
        max_length=context_length,
        num_layers=_decoder_layers(config),
        pad_token_id=_pad_token_id(tokenizer, eos_ids) if generation.pad_token_id is None else generation.pad_token_id,
    )
    for field in ("bos_token_id", "decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id"):
        value = getattr(generation, field, None)
        value = getattr(config, field, None) if value is None else value
        if isinstance(value, list):  # forced_eos_token_id may list several; the first is forced
            value = value[0] if value else None
        if value is not None:
            setattr(defaults, field, value)
    # Only what generation_config.json sets, not transformers' built-in defaults (max_length 20).
    chosen = generation.to_diff_dict()
    max_new_tokens = chosen.get("max_new_tokens")
    if max_new_tokens is None and chosen.get("max_length") is not None:
        # An encoder-decoder's max_length counts its decoder start token; a causal model's counts
        # the prompt, which the server takes off the default when it clamps it to the room left.
        max_new_tokens = chosen["max_length"] - (1 if config.is_encoder_decoder else 0)
    if max_new_tokens is not None:
        defaults.default_max_new_tokens = max_new_tokens
    for field in ("num_beams", "length_penalty", "no_repeat_ngram_size"):
        if chosen.get(field) is not None:
            setattr(defaults, field, chosen[field])
    if isinstance(chosen.get("early_stopping"), bool):  # may also be the string "never"
        defaults.early_stopping = chosen["early_stopping"]
    defaults.suppress_token_ids.extend(_suppressed(generation))
    return defaults


def _suppressed(generation: GenerationConfig) -> list[int]:
    """Tokens never to generate: single-token bad_words_ids (Marian bans its padding) and
    suppress_tokens. Longer bad-word sequences are not carried: the server does not apply them."""
    banned = {ids[0] for ids in generation.bad_words_ids or [] if len(ids) == 1}
    return sorted(banned | set(generation.suppress_tokens or []))


def _decoder_layers(config: PretrainedConfig) -> int:
    # Seq2seq configs count decoder layers apart (T5: num_decoder_layers, BART and Marian:
    # decoder_layers); num_hidden_layers is the encoder's there.
    for field in ("num_decoder_layers", "decoder_layers", "num_hidden_layers"):
        value = getattr(_text_config(config), field, None)
        if value:
            return value
    return 0


def library_versions() -> dict[str, str]:
    versions = {name: importlib.metadata.version(name) for name in _LIBRARIES}
    versions["onnxruntime"] = onnxruntime.__version__  # installed as onnxruntime-gpu
    return versions


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
