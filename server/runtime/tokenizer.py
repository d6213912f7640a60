"""The model's fast (Rust) tokenizer from tokenizer.json, with truncation and padding set per call."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnxserve.server.errors import InvalidArgument, ModelLoadError
from tokenizers import Encoding, Tokenizer

from onnxserve.v1 import manifest_pb2

CONFIGURED_TOKENIZERS = 16


@dataclass(frozen=True)
class TokenizeOptions:
    """How one call tokenizes. `max_length` None means the model's maximum length."""

    truncation: bool = True
    max_length: int | None = None
    add_special_tokens: bool = True
    padding: str | None = None  # None, "longest" or "max_length"
    stride: int = 0
    truncate_only_second: bool = False


class TextTokenizer:
    """Thread-safe wrapper over `tokenizers.Tokenizer`.

    A Tokenizer's truncation and padding are state on the object, so concurrent calls with
    different options would race; each distinct option set gets its own configured copy."""

    def __init__(self, path: Path, manifest: manifest_pb2.Manifest) -> None:
        try:
            self._source = Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception on bad files
            raise ModelLoadError(f"cannot load tokenizer {path}: {error}") from error
        self._source.no_truncation()
        self._source.no_padding()
        self.max_length = manifest.max_length or 512
        tokens = manifest.special_tokens
        self.pad_token = tokens.pad_token
        self.pad_token_id = tokens.pad_token_id
        self.padding_side = tokens.padding_side or "right"
        self.mask_token = tokens.mask_token
        self.clean_up_tokenization_spaces = manifest.clean_up_tokenization_spaces
        self._configured: OrderedDict[TokenizeOptions, Tokenizer] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> Tokenizer:
        """The bare tokenizer, with no truncation or padding."""
        return self._source

    def _configured_for(self, options: TokenizeOptions) -> Tokenizer:
        if options.max_length is not None and not 0 < options.max_length <= self.max_length:
            raise InvalidArgument(
                f"max_length {options.max_length} is outside 1..{self.max_length}, the model's maximum length"
            )
        with self._lock:
            tokenizer = self._configured.get(options)
            if tokenizer is not None:
                self._configured.move_to_end(options)
            else:
                tokenizer = Tokenizer.from_str(self._source.to_str())
                max_length = options.max_length or self.max_length
                if options.truncation:
                    tokenizer.enable_truncation(
                        max_length,
                        stride=options.stride,
                        strategy="only_second" if options.truncate_only_second else "longest_first",
                    )
                if options.padding:
                    tokenizer.enable_padding(
                        direction=self.padding_side,
                        pad_id=self.pad_token_id,
                        pad_token=self.pad_token or "[PAD]",
                        length=max_length if options.padding == "max_length" else None,
                    )
                self._configured[options] = tokenizer
                # Callers choose the options, so keep only the recent option sets in memory.
                if len(self._configured) > CONFIGURED_TOKENIZERS:
                    self._configured.popitem(last=False)
            return tokenizer

    def encode(
        self,
        texts: Sequence[str],
        pairs: Sequence[str] | None = None,
        options: TokenizeOptions | None = None,
    ) -> list[Encoding]:
        """Tokenizes a batch; with truncation off, an input over the maximum length is refused."""
        options = options or TokenizeOptions()
        if pairs and len(pairs) != len(texts):
            raise InvalidArgument(
                f"text_pairs has {len(pairs)} entries but texts has {len(texts)}: give one pair per text"
            )
        inputs = list(zip(texts, pairs, strict=True)) if pairs else list(texts)
        encodings = self._configured_for(options).encode_batch(
            inputs, add_special_tokens=options.add_special_tokens
        )
        if not options.truncation:
            limit = options.max_length or self.max_length
            for index, encoding in enumerate(encodings):
                if len(encoding.ids) > limit:
                    raise InvalidArgument(
                        f"input {index} has {len(encoding.ids)} tokens, over the model's maximum "
                        f"of {limit}, and truncation is off"
                    )
        return encodings

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self._source.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text


# transformers' clean_up_tokenization, in its order: spaces before punctuation and contractions.
_CLEAN_UPS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)  # fmt: skip


def clean_up_tokenization(text: str) -> str:
    for spaced, tight in _CLEAN_UPS:
        text = text.replace(spaced, tight)
    return text


def batch_arrays(encodings: Sequence[Encoding], pad_token_id: int) -> dict[str, np.ndarray]:
    """Right-pads encodings to the longest into the int64 arrays encoder graphs take."""
    length = max(len(e.ids) for e in encodings)
    shape = (len(encodings), length)
    input_ids = np.full(shape, pad_token_id, dtype=np.int64)
    attention_mask = np.zeros(shape, dtype=np.int64)
    token_type_ids = np.zeros(shape, dtype=np.int64)
    for row, encoding in enumerate(encodings):
        size = len(encoding.ids)
        input_ids[row, :size] = encoding.ids
        attention_mask[row, :size] = encoding.attention_mask
        token_type_ids[row, :size] = encoding.type_ids
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
