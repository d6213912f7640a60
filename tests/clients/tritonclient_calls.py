"""Calls onnxserve as a Triton user would, with the real tritonclient[grpc] from PyPI, and prints
what came back as one JSON object. It runs in its own venv (tritonclient pins protobuf below 7),
so it imports nothing from onnxserve or the tests.

    python tritonclient_calls.py TARGET CLASSIFIER_MODEL
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as triton

# Token ids inside any test vocabulary: [CLS]-like, four words, [SEP]-like.
IDS = np.array([[2, 7, 8, 9, 10, 3]], dtype=np.int64)
TEXTS = np.array([["I love this."], ["Café au lait 🙂".encode()]], dtype=object)


def tensor_inputs() -> list[triton.InferInput]:
    inputs = []
    feeds = {"input_ids": IDS, "attention_mask": np.ones_like(IDS), "token_type_ids": np.zeros_like(IDS)}
    for name, value in feeds.items():
        tensor = triton.InferInput(name, list(value.shape), "INT64")
        tensor.set_data_from_numpy(value)  # sent as raw_input_contents
        inputs.append(tensor)
    return inputs


def text_inference(client: triton.InferenceServerClient, model: str) -> dict:
    text = triton.InferInput("text", list(TEXTS.shape), "BYTES")
    text.set_data_from_numpy(TEXTS)
    result = client.infer(model, [text], parameters={"top_k": 1})
    return {
        "label": [[v.decode() for v in row] for row in result.as_numpy("label")],
        "score": result.as_numpy("score").tolist(),
    }


def failure(call) -> dict:
    try:
        call()
    except triton.InferenceServerException as error:
        return {"status": error.status(), "message": error.message()}
    return {}


def main(target: str, model: str) -> None:
    client = triton.InferenceServerClient(target)
    logits = [triton.InferRequestedOutput("logits")]
    tensor_result = client.infer(model, tensor_inputs(), outputs=logits, request_id="t1")
    report = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "server_metadata": client.get_server_metadata(as_json=True),
        "model_metadata": client.get_model_metadata(model, as_json=True),
        "ids": IDS.tolist(),
        "logits": tensor_result.as_numpy("logits").tolist(),
        "request_id": tensor_result.get_response().id,
        "text": text_inference(client, model),
        "unknown_model": failure(lambda: client.infer("no-such-model", tensor_inputs())),
    }
    client.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
