"""A task added through its registration alone: a registration and a pipeline defined here, a
model folder written here (a hand-built ONNX graph that counts each text's tokens), and nothing
else changed. The server serves it over the typed Inference service and over KServe v2 text
requests, both through the same execution path."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnxserve.server.runtime.batching import RowOutputs
from onnxserve.server.tasks.base import EncoderPipeline, Prepared, require_batch
from onnxserve.server.tasks.registration import KServeText, TaskRegistration, register, unregister
from tokenizers import Tokenizer, models, pre_tokenizers

from onnxserve.kserve_v2 import grpc_predict_v2_pb2 as v2
from onnxserve.kserve_v2 import grpc_predict_v2_pb2_grpc as v2_grpc
from onnxserve.repository import TOKENIZER_FILE, sha256, write_manifest
from onnxserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc, manifest_pb2
from tests.conftest import Exported

#: A task number the contract does not name: the registration is all the server knows of it.
TOY_TASK = 1000
MODEL = "token-counter"
LONG_FROM = 4  # tokens
WORDS = ["[PAD]", "[UNK]", "the", "cat", "sat", "on", "a", "mat", "dog"]
TEXTS = ["the cat", "the cat sat on a mat", "a dog", "zebra"]


class TokenCountPipeline(EncoderPipeline[inference_pb2.ClassifyRequest]):
    """Classify each text as "long" or "short" by the token count its graph computes."""

    def preprocess(self, request: inference_pb2.ClassifyRequest) -> Prepared:
        require_batch(request.texts, "texts")
        return Prepared(self.tokenizer.encode(request.texts))

    def postprocess(
        self, request: inference_pb2.ClassifyRequest, prepared: Prepared, outputs: list[RowOutputs]
    ) -> inference_pb2.ClassifyResponse:
        response = inference_pb2.ClassifyResponse()
        for row in outputs:
            count = float(row["tokens"])
            response.results.add().labels.add(label="long" if count >= LONG_FROM else "short", score=count)
        return response


TOY = TaskRegistration(
    name="token-count",
    task=TOY_TASK,
    pipeline=TokenCountPipeline,
    rpcs=frozenset({"Classify"}),
    kserve_text=KServeText("Classify", "texts"),
)


def token_count_graph(path: Path) -> None:
    """tokens[b] = sum over the sequence of attention_mask[b]."""
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])
    tokens = helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch"])
    nodes = [
        helper.make_node("Cast", ["attention_mask"], ["mask_float"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["mask_float", "axis"], ["tokens"], keepdims=0),
    ]
    axis = helper.make_tensor("axis", TensorProto.INT64, [1], [1])
    graph = helper.make_graph(nodes, "token_count", [mask], [tokens], initializer=[axis])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


def word_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def write_version(model_dir: Path) -> None:
    version = model_dir / "1"
    version.mkdir(parents=True)
    token_count_graph(version / "model.fp32.onnx")
    word_tokenizer().save(str(version / TOKENIZER_FILE))
    manifest = manifest_pb2.Manifest(name=MODEL, task=TOY_TASK, max_length=32)
    manifest.special_tokens.pad_token, manifest.special_tokens.pad_token_id = "[PAD]", 0
    graph = manifest_pb2.ModelFile(role="model", path="model.fp32.onnx", sha256=sha256(version / "model.fp32.onnx"))
    manifest.variants.add(precision=common_pb2.PRECISION_FP32, files=[graph])
    write_manifest(version, manifest)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, start_server) -> Iterator:
    register(TOY)
    try:
        model_dir = tmp_path_factory.mktemp("toy") / MODEL
        write_version(model_dir)
        yield start_server({MODEL: Exported(MODEL, model_dir, model_dir)})
    finally:
        unregister(TOY_TASK)


def expected_counts() -> list[int]:
    return [len(encoding.ids) for encoding in word_tokenizer().encode_batch(TEXTS)]


def test_the_toy_task_is_served_over_typed_grpc(server):
    with grpc.insecure_channel(server.target) as channel:
        response = inference_pb2_grpc.InferenceStub(channel).Classify(
            inference_pb2.ClassifyRequest(model=MODEL, texts=TEXTS), timeout=30
        )
    counts = expected_counts()
    assert [result.labels[0].score for result in response.results] == counts
    assert [result.labels[0].label for result in response.results] == [
        "long" if count >= LONG_FROM else "short" for count in counts
    ]
    assert response.metadata.model == MODEL and response.metadata.batch_size >= 1


def test_the_toy_task_is_served_over_kserve_text(server):
    text = v2.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[len(TEXTS)])
    text.contents.bytes_contents.extend(t.encode() for t in TEXTS)
    with grpc.insecure_channel(server.target) as channel:
        response = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            v2.ModelInferRequest(model_name=MODEL, inputs=[text]), timeout=30
        )
    outputs = {output.name: output for output in response.outputs}
    scores = np.frombuffer(response.raw_output_contents[list(outputs).index("score")], dtype=np.float32)
    assert scores.reshape(-1).tolist() == expected_counts()
    assert outputs["label"].datatype == "BYTES"


def test_the_toy_task_refuses_the_rpcs_it_does_not_register(server):
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as refused:
        inference_pb2_grpc.InferenceStub(channel).Encode(inference_pb2.EncodeRequest(model=MODEL, texts=TEXTS))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "token-count" in refused.value.details() and "Classify" in refused.value.details()


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"rpcs": frozenset({"Classify", "Summarize"})}, "['Summarize'] are not RPCs"),
        ({"kserve_text": KServeText("Encode", "texts")}, "not one it serves"),
        ({"kserve_text": KServeText("Classify", "top_k")}, "no repeated string field 'top_k'"),
    ],
)
def test_a_registration_that_does_not_fit_the_contract_is_refused(change, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        dataclasses.replace(TOY, **change)


def test_a_task_number_or_name_is_registered_once():
    with pytest.raises(ValueError, match="clashes with text-classification"):
        register(dataclasses.replace(TOY, task=common_pb2.TASK_TEXT_CLASSIFICATION))
    with pytest.raises(ValueError, match="clashes with fill-mask"):
        register(dataclasses.replace(TOY, name="fill-mask"))
