"""The pipeline mode of KServe v2 ModelInfer: tensors and parameters to the typed request of the
model's RPC, and the typed response back to tensors. Both directions follow the contract's field
names, so every task maps the same way (docs/kserve.md):

- the BYTES input `text` fills the field that the task's registration names (texts, questions or
  prompts: `KServeText`, tasks/registration.py), or the BYTES input `image` (`audio`), encoded
  files, the repeated Image (Audio) field it names (`KServeImage`, `KServeAudio`); any other
  BYTES input fills the repeated string field of its name (text_pairs, contexts,
  candidate_labels, targets, stop);
- each request parameter sets the scalar option of its name (top_k, pooling, max_new_tokens...);
- each scalar field under the response's results becomes an output tensor of that name, with one
  dimension per repeated level, ragged levels padded ("" for text, -1 for integers, NaN for
  floats)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from onnxserve.server.errors import InvalidArgument
from onnxserve.server.tasks.registration import INFERENCE, KServeAudio, KServeFiles, KServeImage, KServeText

from onnxserve.enums import short_name, short_names
from onnxserve.kserve_v2 import grpc_predict_v2_pb2 as v2

TEXT_INPUT = "text"
IMAGE_INPUT = KServeImage.input
AUDIO_INPUT = KServeAudio.input
#: The sub-message that holds an RPC's options when it has one (Generate's GenerationParameters).
OPTIONS_FIELD = "parameters"

#: Leaves whose field name says little on its own.
OUTPUT_NAMES = {
    "onnxserve.v1.Embedding.values": "embedding",
    "onnxserve.v1.TranscriptionChunk.text": "chunk_text",  # beside the Transcription's own text
}

_FLOATS = (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE)
_STRING = FieldDescriptor.TYPE_STRING
_BYTES = FieldDescriptor.TYPE_BYTES
_BOOL = FieldDescriptor.TYPE_BOOL


# --- request -------------------------------------------------------------------------------------


def build_request(
    mapping: KServeText | KServeFiles,
    model: str,
    texts: dict[str, list[str]],
    parameters: Any,
    files: Sequence[bytes] = (),
) -> Message:
    """The typed request of the mapping's RPC from the text inputs by name, the `image` or
    `audio` input's encoded files (image and audio mappings) and the request's parameters; its
    type is the RPC's input in the contract."""
    rpc, main_field = mapping.rpc, mapping.field
    main_input = mapping.input if isinstance(mapping, KServeFiles) else TEXT_INPUT
    request = message_factory.GetMessageClass(INFERENCE.methods_by_name[rpc].input_type)(model=model)
    fields = request.DESCRIPTOR.fields_by_name
    options = getattr(request, OPTIONS_FIELD) if OPTIONS_FIELD in fields else request
    for data in files:  # an Image or an Audio, by the mapping
        getattr(request, main_field).add(data=data)
    for name, values in texts.items():
        field = main_field if name == main_input else name
        target = request if field in request.DESCRIPTOR.fields_by_name else options
        if not _is_text_list(target.DESCRIPTOR.fields_by_name.get(field)):
            allowed = [main_input, *(n for n in _text_lists(request, options) if n != main_field)]
            raise InvalidArgument(f"{rpc} takes the BYTES inputs {allowed}, not {name!r}")
        getattr(target, field).extend(values)
    for name, parameter in parameters.items():
        # The request's own options (Transcribe's chunk_length_s) before its parameters message's.
        target = request if name in _options(request) else options
        if name not in _options(target):
            known = sorted({*_options(request), *_options(options)})
            raise InvalidArgument(f"parameter {name!r} is not an option here; the options are {known}")
        set_option(target, name, parameter)
    return request


def _is_text_list(field: FieldDescriptor | None) -> bool:
    return field is not None and field.is_repeated and field.type == _STRING


def _text_lists(*messages: Message) -> list[str]:
    return list(dict.fromkeys(f.name for m in messages for f in m.DESCRIPTOR.fields if _is_text_list(f)))


def _options(message: Message) -> list[str]:
    return [f.name for f in message.DESCRIPTOR.fields if not f.is_repeated and f.message_type is None
            and f.name not in ("model", "version")]


def set_option(message: Message, name: str, parameter: v2.InferParameter) -> None:
    """Sets the scalar option `name` from a v2 parameter of a fitting kind. Enums take their value
    names ("cls" for POOLING_CLS); floats take an int64 or a decimal string, since this version of
    the protocol has no floating-point parameters."""
    if name not in _options(message):
        raise InvalidArgument(f"parameter {name!r} is not an option here; the options are {_options(message)}")
    field = message.DESCRIPTOR.fields_by_name[name]
    kind = parameter.WhichOneof("parameter_choice")
    value = getattr(parameter, kind) if kind else None
    try:
        setattr(message, name, _convert(field, kind, value))
    except (TypeError, ValueError) as error:
        raise InvalidArgument(f"parameter {name!r}: {value!r} does not fit: {error}") from error


def _convert(field: FieldDescriptor, kind: str | None, value: Any) -> Any:
    if field.enum_type is not None and kind == "string_param":
        names = short_names(field.enum_type)
        if value not in names:
            raise ValueError(f"use one of {sorted(names)}")
        return names[value]
    if field.type in _FLOATS and kind in ("string_param", "int64_param"):
        return float(value)
    wanted = {_STRING: "string_param", _BOOL: "bool_param"}.get(field.type, "int64_param")
    if field.enum_type is not None or field.type in _FLOATS or kind != wanted:
        raise TypeError(f"a {kind or 'missing'} value for a {_type_name(field)} option")
    return value


def _type_name(field: FieldDescriptor) -> str:
    if field.enum_type is not None:
        return "enum (string)"
    return {_STRING: "string", _BOOL: "bool"}.get(field.type, "float" if field.type in _FLOATS else "int64")


# --- response ------------------------------------------------------------------------------------


def response_tensors(response: Message) -> dict[str, np.ndarray]:
    """The scalar leaves under the response's list of results, one padded tensor per leaf."""
    results = next(f for f in response.DESCRIPTOR.fields if f.is_repeated and f.message_type is not None)
    items = getattr(response, results.name)
    rows = [leaves(item) for item in items]
    return {
        name: pad([row[name] for row in rows], field)
        for name, field in leaf_fields(results.message_type).items()
    }


def leaf_fields(descriptor: Descriptor) -> dict[str, FieldDescriptor]:
    """The scalar fields under a message, through its sub-messages, by output name."""
    fields: dict[str, FieldDescriptor] = {}
    for field in descriptor.fields:
        if field.message_type is None:
            fields[OUTPUT_NAMES.get(field.full_name, field.name)] = field
        else:
            fields.update(leaf_fields(field.message_type))
    return fields


def leaves(message: Message) -> dict[str, Any]:
    """Each scalar leaf of a message: a value, or nested lists under repeated fields."""
    values: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is None:
            name = OUTPUT_NAMES.get(field.full_name, field.name)
            values[name] = [_scalar(field, v) for v in value] if field.is_repeated else _scalar(field, value)
        elif field.is_repeated:
            children = [leaves(child) for child in value]
            values.update({name: [c[name] for c in children] for name in leaf_fields(field.message_type)})
        else:
            values.update(leaves(value))
    return values


def _scalar(field: FieldDescriptor, value: Any) -> Any:
    if field.enum_type is not None:
        return short_name(field.enum_type, value)
    return value


def pad(rows: Sequence[Any], field: FieldDescriptor) -> np.ndarray:
    """Nested lists as one array, each ragged level padded to its longest."""
    if field.type == _STRING or field.enum_type is not None:
        dtype, fill = np.dtype(object), ""
    elif field.type == _BYTES:
        dtype, fill = np.dtype(object), b""
    elif field.type in _FLOATS:
        dtype, fill = np.dtype(np.float32), np.nan
    elif field.type == _BOOL:
        dtype, fill = np.dtype(np.bool_), False
    else:
        dtype, fill = np.dtype(np.int64), -1
    array = np.full(_shape(rows), fill, dtype=dtype)
    _fill(array, rows, ())
    return array


def _shape(rows: Any) -> tuple[int, ...]:
    if not isinstance(rows, list):
        return ()
    inner = [_shape(row) for row in rows]
    depth = max((len(s) for s in inner), default=0)
    return (len(rows), *(max((s[i] for s in inner if len(s) > i), default=0) for i in range(depth)))


def _fill(array: np.ndarray, rows: Any, index: tuple[int, ...]) -> None:
    if not isinstance(rows, list):
        array[index] = rows
        return
    for position, row in enumerate(rows):
        _fill(array, row, (*index, position))
