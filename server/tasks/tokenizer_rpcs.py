"""Tokenize and Detokenize: the model's own tokenizer, served for every model."""

from __future__ import annotations

from onnxserve.server.errors import InvalidArgument
from onnxserve.server.runtime.stats import Timings
from onnxserve.server.runtime.tokenizer import TextTokenizer, TokenizeOptions
from onnxserve.server.tasks.base import require_batch

from onnxserve.v1 import inference_pb2

_PADDING = {
    inference_pb2.PADDING_UNSPECIFIED: None,
    inference_pb2.PADDING_LONGEST: "longest",
    inference_pb2.PADDING_MAX_LENGTH: "max_length",
}


def tokenize(
    tokenizer: TextTokenizer, request: inference_pb2.TokenizeRequest, timings: Timings
) -> inference_pb2.TokenizeResponse:
    require_batch(request.texts, "texts")
    if request.padding not in _PADDING:
        raise InvalidArgument(f"unknown padding {request.padding}: use PADDING_LONGEST or PADDING_MAX_LENGTH")
    options = TokenizeOptions(
        truncation=request.truncation if request.HasField("truncation") else True,
        max_length=request.max_length or None,
        add_special_tokens=request.add_special_tokens if request.HasField("add_special_tokens") else True,
        padding=_PADDING[request.padding],
    )
    encodings = timings.timed(
        "tokenization", lambda: tokenizer.encode(request.texts, request.text_pairs, options)
    )
    response = inference_pb2.TokenizeResponse()
    for encoding in encodings:
        message = response.encodings.add(
            input_ids=encoding.ids,
            tokens=encoding.tokens,
            special_tokens_mask=encoding.special_tokens_mask,
            attention_mask=encoding.attention_mask,
            token_type_ids=encoding.type_ids,
            sequence_ids=[-1 if s is None else s for s in encoding.sequence_ids],
        )
        for start, end in encoding.offsets:
            message.offsets.add(start=start, end=end)
        timings.tokens += sum(encoding.attention_mask)
    return response


def detokenize(
    tokenizer: TextTokenizer, request: inference_pb2.DetokenizeRequest, timings: Timings
) -> inference_pb2.DetokenizeResponse:
    require_batch(request.sequences, "sequences")
    skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
    vocab_size = tokenizer.tokenizer.get_vocab_size(with_added_tokens=True)
    for index, sequence in enumerate(request.sequences):
        unknown = [i for i in sequence.ids if i >= vocab_size]
        if unknown:
            raise InvalidArgument(
                f"sequence {index} holds ids outside the vocabulary of {vocab_size}: {unknown[:5]}"
            )
        timings.tokens += len(sequence.ids)
    texts = timings.timed(
        "postprocess", lambda: [tokenizer.decode(s.ids, skip) for s in request.sequences]
    )
    return inference_pb2.DetokenizeResponse(texts=texts)
