"""FillMask: masked-token prediction as the fill-mask pipeline does it: the candidates for every
mask of a text, optionally restricted to target words, each with the text it completes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from onnxserve.server.errors import InvalidArgument, ModelLoadError
from onnxserve.server.runtime.tokenizer import TokenizeOptions
from onnxserve.server.tasks.base import EncoderPipeline, ModelResources, Prepared, RowOutputs, require_batch, softmax
from onnxserve.server.tasks.registration import ExportSpec, KServeText, TaskRegistration
from tokenizers import Encoding

from onnxserve.v1 import common_pb2, inference_pb2

DEFAULT_TOP_K = 5


class FillMaskPipeline(EncoderPipeline[inference_pb2.FillMaskRequest]):
    def __init__(self, resources: ModelResources) -> None:
        super().__init__(resources)
        self.mask_token = self.manifest.special_tokens.mask_token
        mask_token_id = self.tokenizer.tokenizer.token_to_id(self.mask_token) if self.mask_token else None
        if mask_token_id is None:
            raise ModelLoadError("a fill-mask model needs a mask token, and this tokenizer has none")
        self.mask_token_id = mask_token_id

    def preprocess(self, request: inference_pb2.FillMaskRequest) -> Prepared:
        require_batch(request.texts, "texts")
        # The pipeline does not truncate: a cut text could lose its masks, so a long one is refused.
        encodings = self.tokenizer.encode(request.texts, options=TokenizeOptions(truncation=False))
        for index, encoding in enumerate(encodings):
            if self.mask_token_id not in encoding.ids:
                raise InvalidArgument(
                    f"text {index} holds no mask token: write {self.mask_token} where a word is to be predicted"
                )
        return Prepared(encodings, {"target_ids": self.target_ids(request.targets)})

    def target_ids(self, targets: Sequence[str]) -> np.ndarray | None:
        """The token ids of the targets: a target in the vocabulary as it is, otherwise its first
        token (as the pipeline does); None when no targets were given."""
        if not targets:
            return None
        bare = self.tokenizer.tokenizer
        ids = set()
        for target in targets:
            token_id = bare.token_to_id(target)
            if token_id is None:
                pieces = bare.encode(target, add_special_tokens=False).ids
                token_id = pieces[0] if pieces else None
            if token_id is not None:
                ids.add(token_id)
        if not ids:
            raise InvalidArgument("none of the targets maps to a token of the model's vocabulary")
        return np.array(sorted(ids))

    def mask_positions(self, encoding: Encoding) -> np.ndarray:
        return np.flatnonzero(np.asarray(encoding.ids) == self.mask_token_id)

    def forward(self, sequences: Sequence[Encoding]) -> list[RowOutputs]:
        # Only masked positions are scored; keeping just their logits lets the run's whole
        # [batch, tokens, vocabulary] output go as soon as the run ends.
        rows = super().forward(sequences)
        return [
            {"logits": row["logits"][self.mask_positions(encoding)]}
            for encoding, row in zip(sequences, rows, strict=True)
        ]

    def postprocess(
        self, request: inference_pb2.FillMaskRequest, prepared: Prepared, outputs: list[RowOutputs]
    ) -> inference_pb2.FillMaskResponse:
        target_ids = prepared.context["target_ids"]
        top_k = request.top_k or DEFAULT_TOP_K
        response = inference_pb2.FillMaskResponse()
        for encoding, row in zip(prepared.sequences, outputs, strict=True):
            result = response.results.add()
            probabilities = softmax(row["logits"])
            for position, scores in zip(self.mask_positions(encoding), probabilities, strict=True):
                result.masks.add().candidates.extend(self.candidates(encoding.ids, position, scores, target_ids, top_k))
        return response

    def candidates(
        self,
        ids: list[int],
        position: int,
        scores: np.ndarray,
        target_ids: np.ndarray | None,
        top_k: int,
    ) -> list[inference_pb2.MaskCandidate]:
        """The best tokens for one mask by descending probability; with targets, only theirs
        (probabilities stay those of the softmax over the whole vocabulary)."""
        token_ids = np.arange(len(scores)) if target_ids is None else target_ids
        scores = scores[token_ids]
        single_mask = ids.count(self.mask_token_id) == 1
        order = np.argsort(-scores, kind="stable")[:top_k]
        return [
            inference_pb2.MaskCandidate(
                score=float(scores[choice]),
                token=int(token_ids[choice]),
                token_str=self.tokenizer.decode([int(token_ids[choice])], skip_special_tokens=False),
                sequence=self.filled(ids, position, int(token_ids[choice]), single_mask),
            )
            for choice in order
        ]

    def filled(self, ids: list[int], position: int, token_id: int, single_mask: bool) -> str:
        """The text with one mask replaced. With one mask special tokens are left out; with several
        they stay, so the other masks remain visible, as in the pipeline."""
        filled = [token_id if index == position else token for index, token in enumerate(ids)]
        kept = [token for token in filled if token != self.tokenizer.pad_token_id]
        return self.tokenizer.decode(kept, skip_special_tokens=single_mask)


REGISTRATION = TaskRegistration(
    name="fill-mask",
    task=common_pb2.TASK_FILL_MASK,
    pipeline=FillMaskPipeline,
    rpcs=frozenset({"FillMask"}),
    kserve_text=KServeText("FillMask", "texts"),
    export=ExportSpec("fill-mask", "AutoModelForMaskedLM"),
)
