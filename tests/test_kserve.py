"""The KServe v2 service (inference.GRPCInferenceService) through its generated stubs: the health
and metadata RPCs, ModelInfer in tensor and text modes at parity with the typed RPCs, and errors."""

from __future__ import annotations

import logging

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from onnxserve.server.api.kserve.tensors import decode_inputs, split_bytes, to_raw

import onnxserve
from onnxserve.kserve_v2 import grpc_predict_v2_pb2 as v2
from onnxserve.kserve_v2 import grpc_predict_v2_pb2_grpc as v2_grpc
from onnxserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

CLASSIFIER = "bert-sequence-classification"
ENCODER = "bert-feature-extraction"
TAGGER = "bert-token-classification"
READER = "bert-question-answering"
FILLER = "bert-fill-mask"
GENERATOR = "gpt2-causal-lm"
TEXTS = ["I love this.", "Café au lait 🙂 is fine", "A longer sentence that has a few more tokens in it."]
SERVICE = "inference.GRPCInferenceService"


@pytest.fixture(scope="module")
def server(export, start_server):
    exported = {CLASSIFIER: export(CLASSIFIER, precisions=("fp32",)), ENCODER: export(ENCODER, precisions=("fp32",))}
    return start_server(exported)


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as channel:
        yield channel


@pytest.fixture(scope="module")
def task_channel(export, start_server):
    """The other tasks' models, for the text mapping of every typed RPC."""
    kinds = (TAGGER, READER, FILLER, GENERATOR)
    server = start_server({kind: export(kind, precisions=("fp32",)) for kind in kinds})
    with grpc.insecure_channel(server.target) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel):
    return v2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def typed(channel):
    return inference_pb2_grpc.InferenceStub(channel)


def text_input(name: str, texts: list[str]) -> tuple[v2.ModelInferRequest.InferInputTensor, bytes]:
    tensor = v2.ModelInferRequest.InferInputTensor(name=name, datatype="BYTES", shape=[len(texts), 1])
    return tensor, to_raw(np.array(texts, dtype=object), "BYTES")


def tensor_inputs(typed, model: str, texts: list[str]) -> dict[str, np.ndarray]:
    """The graph inputs for the texts, padded as the server pads them, from the Tokenize RPC."""
    response = typed.Tokenize(
        inference_pb2.TokenizeRequest(model=model, texts=texts, padding=inference_pb2.PADDING_LONGEST)
    )
    encodings = response.encodings
    return {
        "input_ids": np.array([e.input_ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.token_type_ids for e in encodings], dtype=np.int64),
    }


def infer_raw(stub, model: str, arrays: dict[str, np.ndarray], **fields) -> v2.ModelInferResponse:
    request = v2.ModelInferRequest(model_name=model, **fields)
    for name, array in arrays.items():
        request.inputs.add(name=name, datatype="INT64", shape=array.shape)
        request.raw_input_contents.append(array.astype("<i8").tobytes())
    return stub.ModelInfer(request)


def output(response: v2.ModelInferResponse, name: str) -> np.ndarray:
    index = [o.name for o in response.outputs].index(name)
    tensor = response.outputs[index]
    raw = response.raw_output_contents[index]
    if tensor.datatype == "BYTES":
        return np.array([b.decode() for b in split_bytes(name, raw)], dtype=object).reshape(tensor.shape)
    dtype = {"FP32": "<f4", "INT64": "<i8"}[tensor.datatype]
    return np.frombuffer(raw, dtype=dtype).reshape(tensor.shape)


def status_of(call, request) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as error:
        call(request)
    return error.value.code()


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


# --- health and metadata ---------------------------------------------------------------------


def test_server_live_ready_and_metadata(stub):
    assert stub.ServerLive(v2.ServerLiveRequest()).live
    assert stub.ServerReady(v2.ServerReadyRequest()).ready
    metadata = stub.ServerMetadata(v2.ServerMetadataRequest())
    assert (metadata.name, metadata.version) == ("onnxserve", onnxserve.__version__)


def test_model_ready(stub):
    assert stub.ModelReady(v2.ModelReadyRequest(name=CLASSIFIER)).ready
    assert stub.ModelReady(v2.ModelReadyRequest(name=CLASSIFIER, version="1")).ready
    assert status_of(stub.ModelReady, v2.ModelReadyRequest(name="nope")) == grpc.StatusCode.NOT_FOUND
    assert status_of(stub.ModelReady, v2.ModelReadyRequest(name=CLASSIFIER, version="7")) == grpc.StatusCode.NOT_FOUND
    assert status_of(stub.ModelReady, v2.ModelReadyRequest(name=CLASSIFIER, version="v1")) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


def test_model_metadata_describes_the_graph(stub):
    metadata = stub.ModelMetadata(v2.ModelMetadataRequest(name=CLASSIFIER))
    assert (metadata.name, list(metadata.versions), metadata.platform) == (CLASSIFIER, ["1"], "onnxruntime_onnx")
    inputs = {t.name: (t.datatype, list(t.shape)) for t in metadata.inputs}
    assert inputs == {name: ("INT64", [-1, -1]) for name in ("input_ids", "attention_mask", "token_type_ids")}
    [logits] = metadata.outputs
    assert (logits.name, logits.datatype, list(logits.shape)) == ("logits", "FP32", [-1, 2])


def test_served_beside_the_typed_services_with_health_and_reflection(channel):
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {SERVICE, "onnxserve.v1.Inference"} <= services
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE))
    assert health.status == health_pb2.HealthCheckResponse.SERVING


# --- ModelInfer: tensors -----------------------------------------------------------------------


def test_tensor_infer_runs_the_graph(stub, typed):
    arrays = tensor_inputs(typed, CLASSIFIER, TEXTS)
    response = infer_raw(stub, CLASSIFIER, arrays, id="call-1")
    assert (response.model_name, response.model_version, response.id) == (CLASSIFIER, "1", "call-1")
    logits = output(response, "logits")
    assert logits.shape == (len(TEXTS), 2)
    classified = typed.Classify(inference_pb2.ClassifyRequest(model=CLASSIFIER, texts=TEXTS))
    for probabilities, result in zip(softmax(logits), classified.results, strict=True):
        best = result.labels[0]
        assert probabilities.max() == pytest.approx(best.score, abs=1e-5)


def test_typed_contents_equal_raw_contents(stub, typed):
    arrays = tensor_inputs(typed, ENCODER, TEXTS)
    request = v2.ModelInferRequest(model_name=ENCODER)
    for name, array in arrays.items():
        request.inputs.add(name=name, datatype="INT64", shape=array.shape).contents.int64_contents.extend(array.flat)
    typed_response = stub.ModelInfer(request)
    raw_response = infer_raw(stub, ENCODER, arrays)
    np.testing.assert_array_equal(
        output(typed_response, "last_hidden_state"), output(raw_response, "last_hidden_state")
    )


def test_requested_outputs_only(stub, typed):
    arrays = tensor_inputs(typed, ENCODER, TEXTS[:1])
    outputs = [v2.ModelInferRequest.InferRequestedOutputTensor(name="last_hidden_state")]
    response = infer_raw(stub, ENCODER, arrays, outputs=outputs)
    assert [o.name for o in response.outputs] == ["last_hidden_state"]
    outputs = [v2.ModelInferRequest.InferRequestedOutputTensor(name="nope")]
    with pytest.raises(grpc.RpcError) as error:
        infer_raw(stub, ENCODER, arrays, outputs=outputs)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nope" in error.value.details()


# --- ModelInfer: text through the pipeline ---------------------------------------------------


def test_text_infer_classifies_like_classify(stub, typed):
    tensor, raw = text_input("text", TEXTS)
    request = v2.ModelInferRequest(model_name=CLASSIFIER, inputs=[tensor], raw_input_contents=[raw])
    request.parameters["top_k"].int64_param = 1
    response = stub.ModelInfer(request)
    classified = typed.Classify(inference_pb2.ClassifyRequest(model=CLASSIFIER, texts=TEXTS, top_k=1))
    assert output(response, "label").tolist() == [[r.labels[0].label] for r in classified.results]
    np.testing.assert_allclose(output(response, "score"), [[r.labels[0].score] for r in classified.results])


def test_text_pairs_with_typed_bytes_contents(stub, typed):
    request = v2.ModelInferRequest(model_name=CLASSIFIER)
    for name, texts in (("text", TEXTS), ("text_pairs", TEXTS[::-1])):
        tensor = request.inputs.add(name=name, datatype="BYTES", shape=[len(texts)])
        tensor.contents.bytes_contents.extend(t.encode() for t in texts)
    response = stub.ModelInfer(request)
    classified = typed.Classify(inference_pb2.ClassifyRequest(model=CLASSIFIER, texts=TEXTS, text_pairs=TEXTS[::-1]))
    assert output(response, "label").shape == (len(TEXTS), 2)
    assert output(response, "sequence").tolist() == [""] * len(TEXTS)  # set by zero-shot only
    np.testing.assert_allclose(output(response, "score"), [[x.score for x in r.labels] for r in classified.results])


def test_text_infer_encodes_like_encode(stub, typed):
    tensor, raw = text_input("text", TEXTS)
    request = v2.ModelInferRequest(model_name=ENCODER, inputs=[tensor], raw_input_contents=[raw])
    request.parameters["normalize"].bool_param = True
    request.parameters["pooling"].string_param = "cls"
    embedding = output(stub.ModelInfer(request), "embedding")
    encoded = typed.Encode(
        inference_pb2.EncodeRequest(model=ENCODER, texts=TEXTS, normalize=True, pooling=common_pb2.POOLING_CLS)
    )
    np.testing.assert_allclose(embedding, [list(e.values) for e in encoded.embeddings], rtol=1e-6)


def text_request(model: str, inputs: dict[str, list[str]], **parameters) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name=model)
    for name, texts in inputs.items():
        tensor = request.inputs.add(name=name, datatype="BYTES", shape=[len(texts)])
        tensor.contents.bytes_contents.extend(t.encode() for t in texts)
    for name, value in parameters.items():
        kind = {bool: "bool_param", int: "int64_param", str: "string_param"}[type(value)]
        setattr(request.parameters[name], kind, value)
    return request


def test_text_answers_like_answer(task_channel):
    questions, contexts = ["Who wrote it?", "Where is it?"], ["Ada Lovelace wrote it in London.", "It is in Paris."]
    response = v2_grpc.GRPCInferenceServiceStub(task_channel).ModelInfer(
        text_request(READER, {"text": questions, "contexts": contexts}, top_k=2)
    )
    answered = inference_pb2_grpc.InferenceStub(task_channel).Answer(
        inference_pb2.AnswerRequest(model=READER, questions=questions, contexts=contexts, top_k=2)
    )
    assert output(response, "answer").tolist() == [[a.answer for a in r.answers] for r in answered.results]
    assert output(response, "start").tolist() == [[a.start for a in r.answers] for r in answered.results]
    np.testing.assert_allclose(output(response, "score"), [[a.score for a in r.answers] for r in answered.results])


def test_text_tags_like_tag_tokens_padding_ragged_results(task_channel):
    texts = ["Ada Lovelace visited the United Nations in Geneva.", "Hi"]
    response = v2_grpc.GRPCInferenceServiceStub(task_channel).ModelInfer(
        text_request(TAGGER, {"text": texts, "ignore_labels": ["nothing"]}, aggregation_strategy="none")
    )
    tagged = inference_pb2_grpc.InferenceStub(task_channel).TagTokens(
        inference_pb2.TagTokensRequest(
            model=TAGGER, texts=texts, ignore_labels=["nothing"],
            aggregation_strategy=inference_pb2.AGGREGATION_STRATEGY_NONE,
        )
    )
    counts = [len(r.entities) for r in tagged.results]
    assert counts[0] > counts[1]  # every token is an entity once nothing is ignored
    words = output(response, "word")
    assert words.shape == (2, counts[0])
    assert words[1].tolist() == [e.word for e in tagged.results[1].entities] + [""] * (counts[0] - counts[1])
    assert output(response, "start")[1, counts[1]:].tolist() == [-1] * (counts[0] - counts[1])
    assert np.isnan(output(response, "score")[1, counts[1]:]).all()


def test_text_fills_masks_like_fill_mask(task_channel):
    texts = ["The [MASK] sat on the mat.", "[MASK] loves [MASK]."]
    response = v2_grpc.GRPCInferenceServiceStub(task_channel).ModelInfer(
        text_request(FILLER, {"text": texts}, top_k=3)
    )
    filled = inference_pb2_grpc.InferenceStub(task_channel).FillMask(
        inference_pb2.FillMaskRequest(model=FILLER, texts=texts, top_k=3)
    )
    tokens = output(response, "token_str")
    assert tokens.shape == (2, 2, 3)  # texts x masks (padded) x candidates
    assert tokens[1].tolist() == [[c.token_str for c in m.candidates] for m in filled.results[1].masks]
    assert tokens[0, 1].tolist() == ["", "", ""]


def test_text_generates_like_generate(task_channel):
    prompts = ["Hello there", "The cat"]
    response = v2_grpc.GRPCInferenceServiceStub(task_channel).ModelInfer(
        text_request(GENERATOR, {"text": prompts}, max_new_tokens=4, repetition_penalty="1.0")
    )
    generated = inference_pb2_grpc.InferenceStub(task_channel).Generate(
        inference_pb2.GenerateRequest(
            model=GENERATOR, prompts=prompts, parameters=inference_pb2.GenerationParameters(max_new_tokens=4)
        )
    )
    assert output(response, "generated_text").tolist() == [r.generated_text for r in generated.results]
    assert output(response, "finish_reason").tolist() == [
        inference_pb2.FinishReason.Name(r.finish_reason).removeprefix("FINISH_REASON_").lower()
        for r in generated.results
    ]
    assert output(response, "generated_tokens").tolist() == [r.generated_tokens for r in generated.results]


# --- errors ------------------------------------------------------------------------------------


def infer_status(stub, request: v2.ModelInferRequest) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request)
    return error.value.code(), error.value.details()


def test_errors_name_the_problem(stub):
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    ids = v2.ModelInferRequest.InferInputTensor(name="input_ids", datatype="INT64", shape=[1, 2])
    ids.contents.int64_contents.extend([1, 2])
    code, details = infer_status(stub, v2.ModelInferRequest(model_name="nope", inputs=[ids]))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in details
    code, details = infer_status(stub, v2.ModelInferRequest(model_name=CLASSIFIER, inputs=[ids]))
    assert code == invalid and "missing: ['attention_mask', 'token_type_ids']" in details
    wrong_type = v2.ModelInferRequest.InferInputTensor(name="input_ids", datatype="FP32", shape=[1, 2])
    wrong_type.contents.fp32_contents.extend([1, 2])
    request = v2.ModelInferRequest(model_name=ENCODER, inputs=[wrong_type])
    for name in ("attention_mask", "token_type_ids"):
        request.inputs.add(name=name, datatype="INT64", shape=[1, 2]).contents.int64_contents.extend([1, 1])
    code, details = infer_status(stub, request)
    assert code == invalid and "is INT64, not FP32" in details
    short = v2.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[3])
    short.contents.bytes_contents.append(b"one")
    code, details = infer_status(stub, v2.ModelInferRequest(model_name=ENCODER, inputs=[short]))
    assert code == invalid and "holds 3 elements but 1 were given" in details
    with_parameters = v2.ModelInferRequest(model_name=ENCODER, inputs=[ids])
    with_parameters.parameters["top_k"].int64_param = 1
    code, details = infer_status(stub, with_parameters)
    assert code == invalid and "tensors take none" in details
    raw = v2.ModelInferRequest(model_name=ENCODER, inputs=[ids], raw_input_contents=[b"\x01", b"\x02"])
    assert infer_status(stub, raw)[0] == invalid
    fp16 = v2.ModelInferRequest.InferInputTensor(name="input_ids", datatype="FP16", shape=[1])
    code, details = infer_status(stub, v2.ModelInferRequest(model_name=ENCODER, inputs=[fp16]))
    assert code == invalid and "raw_input_contents" in details


def test_inputs_the_graph_refuses(stub):
    arrays = {
        "input_ids": np.full((1, 3), 10**6, dtype=np.int64),
        "attention_mask": np.ones((1, 2), dtype=np.int64),
        "token_type_ids": np.zeros((1, 3), dtype=np.int64),
    }
    with pytest.raises(grpc.RpcError) as error:
        infer_raw(stub, ENCODER, arrays)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "refused the inputs" in error.value.details()


def test_text_option_errors(stub):
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    code, details = infer_status(stub, text_request(CLASSIFIER, {"text": ["a"]}, top_k="2"))
    assert code == invalid and "top_k" in details
    code, details = infer_status(stub, text_request(CLASSIFIER, {"text": ["a"]}, topk=2))
    assert code == invalid and "'top_k'" in details  # the options are listed
    code, details = infer_status(stub, text_request(CLASSIFIER, {"text": ["a"], "contexts": ["b"]}))
    assert code == invalid and "text_pairs" in details
    code, details = infer_status(stub, text_request(CLASSIFIER, {"text": ["a"]}, top_k=-1))
    assert code == invalid


def test_text_errors(stub):
    tensor, raw = text_input("text", ["fine"])
    request = v2.ModelInferRequest(model_name=ENCODER, inputs=[tensor], raw_input_contents=[raw])
    request.parameters["pooling"].string_param = "max"
    code, details = infer_status(stub, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "last_token" in details
    request.parameters["pooling"].int64_param = 1
    assert infer_status(stub, request)[0] == grpc.StatusCode.INVALID_ARGUMENT
    bad = v2.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[1])
    bad.contents.bytes_contents.append(b"\xff\xfe")
    code, details = infer_status(stub, v2.ModelInferRequest(model_name=ENCODER, inputs=[bad]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in details


def test_repository_extension_is_not_served(stub, caplog):
    for call, request in ((stub.RepositoryModelLoad, v2.RepositoryModelLoadRequest(model_name=ENCODER)),
                          (stub.RepositoryModelUnload, v2.RepositoryModelUnloadRequest(model_name=ENCODER))):
        with caplog.at_level(logging.WARNING), pytest.raises(grpc.RpcError) as error:
            call(request)
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "repository extension" in error.value.details() and "hot reload" in error.value.details()
    # An RPC the protocol has and onnxserve does not serve is nothing alarming: no error, no traceback.
    assert not [record.getMessage() for record in caplog.records], caplog.text


# --- the tensor codec --------------------------------------------------------------------------


def test_bytes_and_fp16_round_trip_through_raw_contents():
    texts = np.array(["", "héllo", "🙂" * 3], dtype=object)
    assert [b.decode() for b in split_bytes("t", to_raw(texts, "BYTES"))] == texts.tolist()
    halves = np.array([[0.5, -1.25]], dtype=np.float16)
    request = v2.ModelInferRequest(raw_input_contents=[to_raw(halves, "FP16")])
    request.inputs.add(name="h", datatype="FP16", shape=[1, 2])
    np.testing.assert_array_equal(decode_inputs(request)["h"], halves)
