"""Classify for multiple-choice models: each text is a prompt, candidate_labels are its choices,
and the choices are ranked by the softmax over their logits, as AutoModelForMultipleChoice scores
them."""

from __future__ import annotations

from collections.abc import Sequence

from onnxserve.server.errors import InvalidArgument
from onnxserve.server.runtime.tokenizer import batch_arrays
from onnxserve.server.tasks.base import EncoderPipeline, Prepared, RowOutputs, require_batch, softmax
from onnxserve.server.tasks.registration import ExportSpec, KServeText, TaskRegistration
from onnxserve.server.tasks.text_classification import candidate_results, encode_candidates
from tokenizers import Encoding

from onnxserve.v1 import common_pb2, inference_pb2


class MultipleChoicePipeline(EncoderPipeline[inference_pb2.ClassifyRequest]):
    def preprocess(self, request: inference_pb2.ClassifyRequest) -> Prepared:
        require_batch(request.texts, "texts")
        if not request.candidate_labels:
            raise InvalidArgument("a multiple-choice model needs candidate_labels: the choices for each text")
        if request.multi_label or request.hypothesis_template:
            raise InvalidArgument("multi_label and hypothesis_template are for zero-shot models, not multiple choice")
        return encode_candidates(self.tokenizer, request, request.candidate_labels)

    def forward(self, sequences: Sequence[Encoding]) -> list[RowOutputs]:
        # The graph takes [batch, choices, tokens] and scores every choice on its own, so all the
        # rows go in as the choices of one batch entry: each row's logit depends on that row
        # alone, whichever requests the batcher merged into the run.
        feeds = {name: array[None] for name, array in batch_arrays(sequences, self.tokenizer.pad_token_id).items()}
        logits = self.session.run(feeds)["logits"][0]
        return [{"logits": logit} for logit in logits]

    def postprocess(
        self, request: inference_pb2.ClassifyRequest, prepared: Prepared, outputs: list[RowOutputs]
    ) -> inference_pb2.ClassifyResponse:
        return candidate_results(request, outputs, softmax)


REGISTRATION = TaskRegistration(
    name="multiple-choice",
    task=common_pb2.TASK_MULTIPLE_CHOICE,
    pipeline=MultipleChoicePipeline,
    rpcs=frozenset({"Classify"}),
    kserve_text=KServeText("Classify", "texts"),
    export=ExportSpec("multiple-choice", "AutoModelForMultipleChoice"),
)
