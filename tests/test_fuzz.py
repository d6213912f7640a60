"""Property-based fuzzing of every RPC the server exposes: messages drawn from each method's own
descriptor, with random Unicode, empty and huge texts, absurd numbers, unknown enum values,
unknown fields, and model names both real and made up. Whatever comes in, the server answers
with a status (INTERNAL or UNKNOWN never without a message), and valid calls still succeed.

ONNXSERVE_FUZZ_EXAMPLES sets the examples per RPC (default 20, about a minute in all)."""

from __future__ import annotations

import os

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnxserve.server.app import SERVICE_NAMES

KINDS = (
    "bert-sequence-classification", "bert-feature-extraction", "bert-token-classification",
    "bert-question-answering", "bert-fill-mask", "gpt2-causal-lm",
)
EXAMPLES = int(os.environ.get("ONNXSERVE_FUZZ_EXAMPLES", "20"))
CALL_TIMEOUT_S = 20
MAX_DEPTH = 3
MODEL_FIELDS = ("model", "model_name", "name")
# The model that serves each RPC, offered more often than the others so that calls go deep.
SERVES = {
    "Encode": "bert-feature-extraction", "Classify": "bert-sequence-classification",
    "TagTokens": "bert-token-classification", "Answer": "bert-question-answering", "FillMask": "bert-fill-mask",
    "Generate": "gpt2-causal-lm", "GenerateStream": "gpt2-causal-lm", "ModelInfer": "bert-sequence-classification",
}
METHODS = [
    method
    for service in SERVICE_NAMES
    for method in descriptor_pool.Default().FindServiceByName(service).methods
    if not method.client_streaming
]
F = FieldDescriptor
INT_RANGES = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1), F.TYPE_SINT32: (-(2**31), 2**31 - 1), F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1), F.TYPE_SINT64: (-(2**63), 2**63 - 1), F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1), F.TYPE_FIXED64: (0, 2**64 - 1),
}

texts = st.one_of(
    st.text(max_size=40),
    st.builds("{} [MASK] {}".format, st.text(max_size=20), st.text(max_size=20)),  # reaches FillMask's work
    st.just(""),
    st.text(st.characters(codec="utf-8"), max_size=200),
    st.builds(lambda piece, count: piece * count, st.text(min_size=1, max_size=8), st.integers(5_000, 60_000)),
)


def integers(low: int, high: int) -> st.SearchStrategy[int]:
    """Mostly small values (real options), sometimes the type's extremes and their neighbours."""
    extremes = [v for v in (low, low + 1, -1, 0, 1, 2**31 - 1, 2**31, high - 1, high) if low <= v <= high]
    return st.one_of(st.integers(max(low, -3), min(high, 600)), st.sampled_from(extremes), st.integers(low, high))


def field_values(field: FieldDescriptor, depth: int, models: list[str]) -> st.SearchStrategy:
    """Values for one field; a repeated field gets a short list, now and then a long list of
    short values (long lists of huge texts would only ever meet the message size limit)."""
    single = scalar_values(field, depth, models)
    if not field.is_repeated:
        return single
    if field.message_type is not None:
        if field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            return st.dictionaries(scalar_values(key, depth, models), scalar_values(value, depth, models), max_size=3)
        return st.lists(single, max_size=4)
    short = st.text(max_size=12) if field.type == F.TYPE_STRING else single
    return st.one_of(st.lists(single, min_size=1, max_size=4), st.just([]), st.lists(short, min_size=100, max_size=300))


def scalar_values(field: FieldDescriptor, depth: int, models: list[str]) -> st.SearchStrategy:
    if field.type == F.TYPE_MESSAGE:
        return messages(field.message_type, depth + 1, models)
    if field.type == F.TYPE_STRING:
        if field.name in MODEL_FIELDS:
            # Mostly a real model, so that calls get past the lookup.
            return st.sampled_from([*models, None]).flatmap(lambda model: texts if model is None else st.just(model))
        return texts
    if field.type == F.TYPE_BYTES:
        return st.binary(max_size=64)
    if field.name == "version" and field.type == F.TYPE_UINT32:
        return st.one_of(st.just(0), integers(*INT_RANGES[field.type]))  # 0: the latest
    if field.type == F.TYPE_BOOL:
        return st.booleans()
    if field.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return st.floats(width=32 if field.type == F.TYPE_FLOAT else 64)
    if field.type == F.TYPE_ENUM:
        return st.integers(-1, max(v.number for v in field.enum_type.values) + 2)  # unknown values too
    return integers(*INT_RANGES[field.type])


def messages(descriptor: Descriptor, depth: int, models: list[str]) -> st.SearchStrategy[Message]:
    cls = message_factory.GetMessageClass(descriptor)
    if depth > MAX_DEPTH:
        return st.just(cls())
    fields = {f.name: field_values(f, depth, models) for f in descriptor.fields}
    # The model and the texts are always there, so that most calls get past the first checks.
    always = [f for f in descriptor.fields if f.name in MODEL_FIELDS or (f.is_repeated and f.type == F.TYPE_STRING)]
    required = {f.name: fields.pop(f.name) for f in always}
    return st.fixed_dictionaries(required, optional=fields).map(lambda values: cls(**values))


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def unknown_field(number: int, value: int | bytes) -> bytes:
    """A field as encoded on the wire: a varint, or length-delimited bytes."""
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    return varint(number << 3 | 2) + varint(len(value)) + value


# Fields numbered where no message of the contract has any: a newer client's additions.
unknown_fields = st.lists(
    st.builds(unknown_field, st.integers(1000, 5000), st.one_of(st.integers(0, 2**64 - 1), st.binary(max_size=32))),
    max_size=3,
).map(b"".join)


@pytest.fixture(scope="module")
def server(export, start_server):
    return start_server({kind: export(kind, precisions=("fp32",)) for kind in KINDS})


def call(channel: grpc.Channel, method: MethodDescriptor, payload: bytes) -> tuple[grpc.StatusCode, str]:
    """Sends raw bytes to a method; the response is read (all of it, for a stream) but not parsed."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    kind = channel.unary_stream if method.server_streaming else channel.unary_unary
    stub = kind(path, request_serializer=None, response_deserializer=None)
    try:
        response = stub(payload, timeout=CALL_TIMEOUT_S)
        if method.server_streaming:
            for _ in response:
                pass
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def assert_still_serving(server) -> None:
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    with server.client() as client:
        assert client.classify(model=KINDS[0], texts=["still fine"])
        assert client.tokenize(model=KINDS[1], texts=["still fine"])


@pytest.mark.parametrize("method", METHODS, ids=lambda m: f"{m.containing_service.name}.{m.name}")
def test_every_rpc_survives_random_input(server, method):
    seen: dict[str, int] = {}
    first_details: dict[str, str] = {}

    models = [*[SERVES[method.name]] * 5, *KINDS] if method.name in SERVES else list(KINDS)

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(request=messages(method.input_type, 0, models), extra=unknown_fields)
    def check(request: Message, extra: bytes) -> None:
        with grpc.insecure_channel(server.target) as channel:
            code, details = call(channel, method, request.SerializeToString() + extra)
        seen[code.name] = seen.get(code.name, 0) + 1
        first_details.setdefault(code.name, details[:200])
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            assert details.strip(), f"{code.name} without a message for {request}"
        # A status message too long for the client's header limit would hide the real status.
        assert "metadata size exceeds" not in details, details

    check()
    print(f"\n{method.containing_service.name}.{method.name}: {seen} {first_details}")
    assert_still_serving(server)


def test_malformed_bytes_get_a_status_with_a_message(server):
    """Bytes that are not a valid message at all, on every RPC."""
    with grpc.insecure_channel(server.target) as channel:
        for method in METHODS:
            code, details = call(channel, method, b"\x0a\xff\xff\xff\xff\x0f")  # a length past the end
            assert code != grpc.StatusCode.OK and details, method.name
    assert_still_serving(server)
