"""TagTokens: token classification as the ner / token-classification pipeline does it: a label per
token, optionally merged into words (first, average, max) and grouped into entities by B-/I- tags."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from onnxserve.server.errors import InvalidArgument
from onnxserve.server.tasks.base import EncoderPipeline, ModelResources, Prepared, RowOutputs, require_batch, softmax
from onnxserve.server.tasks.registration import ExportSpec, KServeText, TaskRegistration
from tokenizers import Encoding

from onnxserve.v1 import common_pb2, inference_pb2

Strategy = inference_pb2.AggregationStrategy
WORD_STRATEGIES = frozenset(
    {Strategy.AGGREGATION_STRATEGY_FIRST, Strategy.AGGREGATION_STRATEGY_AVERAGE, Strategy.AGGREGATION_STRATEGY_MAX}
)
DEFAULT_IGNORE_LABELS = frozenset({"O"})


@dataclass(frozen=True)
class Piece:
    """One token of the text with its label probabilities (the pipeline's pre-entity)."""

    word: str
    scores: np.ndarray
    start: int
    end: int
    index: int
    is_subword: bool


@dataclass(frozen=True)
class Tagged:
    """A token, or a word of tokens, with its label (the pipeline's entity before grouping)."""

    label: str
    score: float
    word: str
    start: int
    end: int
    index: int = 0


class TokenClassificationPipeline(EncoderPipeline[inference_pb2.TagTokensRequest]):
    def __init__(self, resources: ModelResources) -> None:
        super().__init__(resources)
        bare = self.tokenizer.tokenizer
        self.labels = list(self.manifest.labels)
        self.unk_token_id = bare.token_to_id(self.manifest.special_tokens.unk_token or "")
        # Tokenizers that mark continuation pieces (WordPiece's "##") tell sub-words apart exactly;
        # for the others the pipeline guesses from the characters around the token.
        self.marks_subwords = bool(getattr(bare.model, "continuing_subword_prefix", None))

    def preprocess(self, request: inference_pb2.TagTokensRequest) -> Prepared:
        require_batch(request.texts, "texts")
        if request.aggregation_strategy not in Strategy.values():
            raise InvalidArgument(f"unknown aggregation_strategy {request.aggregation_strategy}")
        # Truncated to the model's maximum length, as the pipeline does.
        return Prepared(self.tokenizer.encode(request.texts))

    def postprocess(
        self, request: inference_pb2.TagTokensRequest, prepared: Prepared, outputs: list[RowOutputs]
    ) -> inference_pb2.TagTokensResponse:
        strategy = request.aggregation_strategy or Strategy.AGGREGATION_STRATEGY_SIMPLE
        ignored = set(request.ignore_labels) or DEFAULT_IGNORE_LABELS
        response = inference_pb2.TagTokensResponse()
        for text, encoding, row in zip(request.texts, prepared.sequences, outputs, strict=True):
            pieces = self.pieces(text, encoding, softmax(row["logits"]))
            entities = self.entities(pieces, strategy)
            kept = [e for e in entities if (e.entity or e.entity_group) not in ignored]
            response.results.add().entities.extend(kept)
        return response

    def pieces(self, text: str, encoding: Encoding, scores: np.ndarray) -> list[Piece]:
        """The text's tokens, special tokens left out, each marked as a word start or a sub-word."""
        pieces = []
        for index, (token_id, (start, end)) in enumerate(zip(encoding.ids, encoding.offsets, strict=True)):
            if encoding.special_tokens_mask[index]:
                continue
            word = encoding.tokens[index]
            if token_id == self.unk_token_id:
                # An unknown token shows the text it stands for, and starts a word.
                pieces.append(Piece(text[start:end], scores[index], start, end, index, False))
                continue
            if self.marks_subwords:
                is_subword = len(word) != len(text[start:end])
            else:
                is_subword = start > 0 and " " not in text[start - 1 : start + 1]
            pieces.append(Piece(word, scores[index], start, end, index, is_subword))
        return pieces

    def entities(self, pieces: list[Piece], strategy: int) -> list[inference_pb2.Entity]:
        if strategy in WORD_STRATEGIES:
            tagged = [self.tag_word(word, strategy) for word in words(pieces)]
        else:
            tagged = [self.tag_token(piece) for piece in pieces]
        if strategy == Strategy.AGGREGATION_STRATEGY_NONE:
            return [
                inference_pb2.Entity(
                    entity=t.label, score=t.score, word=t.word, start=t.start, end=t.end, index=t.index
                )
                for t in tagged
            ]
        return [self.group(members) for members in entity_groups(tagged)]

    def tag_token(self, piece: Piece) -> Tagged:
        best = int(piece.scores.argmax())
        return Tagged(self.labels[best], float(piece.scores[best]), piece.word, piece.start, piece.end, piece.index)

    def tag_word(self, pieces: list[Piece], strategy: int) -> Tagged:
        """One label for a whole word: its first token's, its most confident token's, or the best
        of the scores averaged over its tokens."""
        if strategy == Strategy.AGGREGATION_STRATEGY_AVERAGE:
            scores = np.nanmean(np.stack([p.scores for p in pieces]), axis=0)
        elif strategy == Strategy.AGGREGATION_STRATEGY_MAX:
            scores = max(pieces, key=lambda p: p.scores.max()).scores
        else:
            scores = pieces[0].scores
        best = int(scores.argmax())
        word = self.join([p.word for p in pieces])
        return Tagged(self.labels[best], float(scores[best]), word, pieces[0].start, pieces[-1].end)

    def group(self, members: list[Tagged]) -> inference_pb2.Entity:
        # The pipeline names the group after the first label's text past its first "-".
        return inference_pb2.Entity(
            entity_group=members[0].label.split("-", 1)[-1],
            score=float(np.nanmean([m.score for m in members])),
            word=self.join([m.word for m in members]),
            start=members[0].start,
            end=members[-1].end,
        )

    def join(self, tokens: list[str]) -> str:
        """Tokens back to text with the tokenizer's decoder (sub-word pieces merged)."""
        decoder = self.tokenizer.tokenizer.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)


def words(pieces: list[Piece]) -> list[list[Piece]]:
    """Pieces grouped into words: each sub-word joins the word before it."""
    grouped: list[list[Piece]] = []
    for piece in pieces:
        if grouped and piece.is_subword:
            grouped[-1].append(piece)
        else:
            grouped.append([piece])
    return grouped


def split_tag(label: str) -> tuple[str, str]:
    """("B" or "I", entity type); a label without a B-/I- prefix continues like I-."""
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label


def entity_groups(tagged: Sequence[Tagged]) -> list[list[Tagged]]:
    """Adjacent tokens (or words) of one entity type; a B- tag always starts a new entity."""
    groups: list[list[Tagged]] = []
    for item in tagged:
        bi, tag = split_tag(item.label)
        if groups and bi != "B" and tag == split_tag(groups[-1][-1].label)[1]:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


REGISTRATION = TaskRegistration(
    name="token-classification",
    task=common_pb2.TASK_TOKEN_CLASSIFICATION,
    pipeline=TokenClassificationPipeline,
    rpcs=frozenset({"TagTokens"}),
    kserve_text=KServeText("TagTokens", "texts"),
    export=ExportSpec("token-classification", "AutoModelForTokenClassification"),
)
