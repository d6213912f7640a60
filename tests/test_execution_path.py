"""Both protocols take the same execution path: a generation asked for over KServe v2 decodes on
the generation executor's threads, as a typed Generate does (it once ran on the tokenizing pool,
where a long generation took the threads that encoder calls tokenize on)."""

from __future__ import annotations

import threading

import grpc
import pytest
from onnxserve.server.tasks.generation import drivers

from onnxserve.kserve_v2 import grpc_predict_v2_pb2 as v2
from onnxserve.kserve_v2 import grpc_predict_v2_pb2_grpc as v2_grpc
from onnxserve.v1 import inference_pb2, inference_pb2_grpc

GENERATOR = "gpt2-causal-lm"
PROMPT = "Hello there"


@pytest.fixture(scope="module")
def server(export, start_server):
    return start_server({GENERATOR: export(GENERATOR, precisions=("fp32",))}, warmup=False)


@pytest.fixture
def step_threads(monkeypatch) -> list[str]:
    """The name of the thread each decoding step of a solo generation runs on."""
    threads: list[str] = []
    step = drivers.SoloGeneration.step

    def recorded_step(self) -> bool:
        threads.append(threading.current_thread().name)
        return step(self)

    monkeypatch.setattr(drivers.SoloGeneration, "step", recorded_step)
    return threads


def kserve_generate(channel: grpc.Channel) -> v2.ModelInferResponse:
    text = v2.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(PROMPT.encode())
    request = v2.ModelInferRequest(model_name=GENERATOR, inputs=[text])
    request.parameters["max_new_tokens"].int64_param = 3
    return v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)


def test_kserve_and_typed_generation_decode_on_the_generation_executor(server, step_threads):
    with grpc.insecure_channel(server.target) as channel:
        typed = inference_pb2_grpc.InferenceStub(channel).Generate(
            inference_pb2.GenerateRequest(
                model=GENERATOR, prompts=[PROMPT], parameters=inference_pb2.GenerationParameters(max_new_tokens=3)
            ),
            timeout=60,
        )
        typed_steps = len(step_threads)
        kserve = kserve_generate(channel)
    assert typed.results[0].generated_tokens == 3 and typed_steps >= 3
    assert len(step_threads) - typed_steps >= 3, "the KServe generation took no decoding steps"
    assert all(name.startswith("onnxserve-generation") for name in step_threads), step_threads
    texts = {output.name: output for output in kserve.outputs}
    assert "generated_text" in texts
