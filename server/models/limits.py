"""What one request may ask of a model, checked before any work is spent on it.

A request over the model's max_inputs_per_request, or whose answer could not fit the server's
largest response (max_send_message_bytes), is refused with INVALID_ARGUMENT naming the limit: the
alternative is tokenizing and running all of it (while other callers queue behind it) only for the
answer to be refused at the end, by the server's send limit or the client's receive limit."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message
from onnxserve.server.errors import InvalidArgument

#: The repeated field that holds a request's inputs, by its name in the contract: the first of
#: these a request type has (Encode's texts, Answer's questions, Generate's prompts, Detokenize's
#: token sequences, image requests' images, speech requests' audios).
INPUT_FIELDS = ("texts", "questions", "prompts", "images", "audios", "sequences")
#: Float32s each input adds to an answer, at least: Encode answers one vector of the model's
#: hidden size per text, ReconstructImage one image of the model's input size (channels x height x
#: width). Other answers are small beside that (labels, spans, tokens).
FLOAT_BYTES = 4


@dataclass(frozen=True)
class RequestLimits:
    """A model's per-request limits, as GetModel reports them."""

    max_inputs: int  # the model's max_inputs_per_request
    max_response_bytes: int  # the server's max_send_message_bytes
    hidden_size: int  # the model's, which sizes Encode's answers
    image_values: int = 0  # channels x height x width of its processed images, which size ReconstructImage's


@functools.cache
def _input_field_of(descriptor: Descriptor) -> str | None:
    return next((name for name in INPUT_FIELDS if name in descriptor.fields_by_name), None)


def input_field(request: Message) -> str | None:
    """The name of the request's inputs field; None for single-input requests (GenerateStream).
    Looked up once per request type: the lookup showed in the per-call profile."""
    return _input_field_of(request.DESCRIPTOR)


def least_answer_bytes(rpc: str, inputs: int, limits: RequestLimits) -> int:
    """A lower bound on the answer's size: what it could not be smaller than."""
    floats = {"Encode": limits.hidden_size, "ReconstructImage": limits.image_values}.get(rpc, 0)
    return inputs * floats * FLOAT_BYTES


def check_request(rpc: str, request: Message, limits: RequestLimits, model: str) -> None:
    """Refuses, before any work, a request over the model's input limit or whose answer could not
    fit the server's largest response."""
    name = input_field(request)
    if name is None:
        return
    inputs = len(getattr(request, name))
    if inputs > limits.max_inputs:
        raise InvalidArgument(
            f"the request holds {inputs} {name}, over model {model!r}'s limit of {limits.max_inputs} per request "
            "(max_inputs_per_request); send them in several calls"
        )
    answer = least_answer_bytes(rpc, inputs, limits)
    if answer > limits.max_response_bytes:
        per_input = answer // inputs
        raise InvalidArgument(
            f"the answer to {inputs} {name} would take at least {answer} bytes ({per_input} per input), over the "
            f"server's largest response of {limits.max_response_bytes} bytes (max_send_message_bytes); send at "
            f"most {limits.max_response_bytes // per_input} per call"
        )
