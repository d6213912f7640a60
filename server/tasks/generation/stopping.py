"""When a sequence ends (max new tokens, an EOS id, a stop string), and the sequence itself: its
tokens and its text, released in pieces that never need taking back."""

from __future__ import annotations

from dataclasses import dataclass

from onnxserve.server.tasks.generation.streaming import IncrementalDecoder

from onnxserve.v1 import inference_pb2

LENGTH = inference_pb2.FINISH_REASON_LENGTH
EOS = inference_pb2.FINISH_REASON_EOS
STOP = inference_pb2.FINISH_REASON_STOP


@dataclass(frozen=True)
class StoppingCriteria:
    max_new_tokens: int
    eos_token_ids: frozenset[int]
    stop: tuple[str, ...] = ()

    def token_ends(self, token: int, generated: int) -> int | None:
        """The finish reason once `token` is the `generated`-th new token, or None to go on."""
        if token in self.eos_token_ids:
            return EOS
        if generated >= self.max_new_tokens:
            return LENGTH
        return None

    def find_stop(self, text: str, start: int) -> int:
        """Where the first stop string begins in text[start:], or -1."""
        found = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(found, default=-1)

    def pending(self, text: str) -> int:
        """How many trailing characters of `text` could still grow into a stop string; a stream
        holds them back so that the text it prints is never cut off later."""
        return max(
            (k for s in self.stop for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
            default=0,
        )


class OutputSequence:
    """One sequence being generated: tokens in, text and finish reason out."""

    def __init__(self, criteria: StoppingCriteria, decoder: IncrementalDecoder) -> None:
        self.criteria = criteria
        self.decoder = decoder
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: int | None = None
        self._released_text = 0
        self._released_tokens = 0
        self._longest_stop = max((len(s) for s in criteria.stop), default=0)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int) -> None:
        self.tokens.append(token)
        reason = self.criteria.token_ends(token, len(self.tokens))
        self._add_text(self.decoder.push(token))
        if reason is not None and not self.finished:
            self._add_text(self.decoder.flush())
            self.finish_reason = self.finish_reason or reason

    def _add_text(self, piece: str) -> None:
        if not piece or self.finished:
            return
        searched = max(0, len(self.text) - self._longest_stop + 1)
        self.text += piece
        stop_at = self.criteria.find_stop(self.text, searched) if self.criteria.stop else -1
        if stop_at >= 0:
            self.text = self.text[:stop_at]
            self.finish_reason = STOP

    def release(self) -> tuple[str, list[int]]:
        """The text and tokens not released before; text that may begin a stop string waits
        until the sequence ends."""
        end = len(self.text) if self.finished else len(self.text) - self.criteria.pending(self.text)
        end = max(end, self._released_text)
        if end == self._released_text and not self.finished:
            return "", []  # the tokens go out with the text they complete
        piece, tokens = self.text[self._released_text : end], self.tokens[self._released_tokens :]
        self._released_text, self._released_tokens = end, len(self.tokens)
        return piece, tokens
