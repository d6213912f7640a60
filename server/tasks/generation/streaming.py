"""Incremental detokenization: text that grows one token at a time and is never printed twice.

A token is not always a whole character: byte-level BPE splits an emoji or a CJK character over
several tokens, and sentencepiece-style decoders turn a leading "▁" into a space only in context.
So each new token is decoded together with a few tokens before it, and only the text beyond what
those earlier tokens already gave is new; while the result ends in an incomplete character (the
replacement char U+FFFD), nothing is released and the next token is awaited."""

from __future__ import annotations

from tokenizers import Tokenizer

_INCOMPLETE = "\ufffd"


class IncrementalDecoder:
    """The text of a growing token sequence, released piece by piece; the pieces joined equal
    `tokenizer.decode(tokens)` for the tokenizers served here."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = []
        # tokens[prefix:read] were decoded already and give the context of the next decode;
        # tokens[read:] are not released yet.
        self._prefix = 0
        self._read = 0

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.tokens[start:end], skip_special_tokens=self.skip_special_tokens)

    def push(self, token: int) -> str:
        """Adds a token; returns the text it completes (often "", sometimes several characters)."""
        self.tokens.append(token)
        known = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix)
        if len(text) <= len(known) or text.endswith(_INCOMPLETE):
            return ""
        self._prefix, self._read = self._read, len(self.tokens)
        return text[len(known) :]

    def flush(self) -> str:
        """The text still held back once no token will follow (an incomplete character stays as
        U+FFFD, as a full decode gives it)."""
        known = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix)
        self._prefix = self._read = len(self.tokens)
        return text[len(known) :]
