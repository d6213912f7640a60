"""KServe v2 ModelInfer with a BYTES input named `image`: each element an encoded file, run through
the whole pipeline of the model's task as its registration maps it (KServeImage): ClassifyImage
(image classification, and zero-shot with a `candidate_labels` input), EncodeImage and
ReconstructImage; the results equal the typed calls'. And the image requests it refuses."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from onnxserve.server.api.kserve.tensors import split_bytes

from onnxserve.kserve_v2 import grpc_predict_v2_pb2 as v2
from onnxserve.kserve_v2 import grpc_predict_v2_pb2_grpc as v2_grpc
from tests import test_classify_image, test_classify_image_zero_shot, test_encode_image, test_reconstruct_image
from tests.test_classify_image import FILES
from tests.test_kserve import output

CLASSIFIER, ZERO_SHOT = "vit-image-classification", "clip-zero-shot"
ENCODER, RECONSTRUCTOR = "vit-image-features", "vit-masked-image-modeling"
IMAGES = [FILES["png"], FILES["jpeg-exif-rotated"], FILES["png-rgba"]]


@pytest.fixture(scope="module")
def server(tmp_path_factory, export, start_server):
    sources = {
        CLASSIFIER: test_classify_image.build(CLASSIFIER, tmp_path_factory.mktemp(CLASSIFIER)),
        ZERO_SHOT: test_classify_image_zero_shot.build(tmp_path_factory.mktemp(ZERO_SHOT)),
        ENCODER: test_encode_image.build_vit(tmp_path_factory.mktemp(ENCODER)),
        RECONSTRUCTOR: test_reconstruct_image.build(tmp_path_factory.mktemp(RECONSTRUCTOR)),
    }
    # CLIP as one zero-shot graph, whose KServe image input runs ClassifyImage (its default export,
    # the two towers, maps the image input to EncodeImage: tests/test_encode_image.py).
    tasks = {ZERO_SHOT: "zero-shot-image-classification"}
    exported = {
        name: export(name, precisions=("fp32",), source=source, task=tasks.get(name))
        for name, source in sources.items()
    }
    return start_server(exported, precision="fp32", intra_op_threads=1)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield v2_grpc.GRPCInferenceServiceStub(channel)


def image_request(model: str, images: list[bytes], texts: dict[str, list[str]] | None = None, **parameters):
    request = v2.ModelInferRequest(model_name=model)
    request.inputs.add(name="image", datatype="BYTES", shape=[len(images)]).contents.bytes_contents.extend(images)
    for name, values in (texts or {}).items():
        request.inputs.add(name=name, datatype="BYTES", shape=[len(values)]).contents.bytes_contents.extend(
            value.encode() for value in values
        )
    for name, value in parameters.items():
        kind = {bool: "bool_param", int: "int64_param", str: "string_param"}[type(value)]
        setattr(request.parameters[name], kind, value)
    return request


def test_image_classifies_like_classify_image(stub, server):
    response = stub.ModelInfer(image_request(CLASSIFIER, IMAGES, top_k=3))
    with server.client() as client:
        typed = client.classify_image(model=CLASSIFIER, images=IMAGES, top_k=3)
    assert output(response, "label").tolist() == [[x.label for x in r.labels] for r in typed]
    np.testing.assert_array_equal(output(response, "score"), [[x.score for x in r.labels] for r in typed])


def test_image_with_candidate_labels_classifies_zero_shot(stub, server):
    labels = test_classify_image_zero_shot.LABELS
    response = stub.ModelInfer(image_request(ZERO_SHOT, IMAGES, {"candidate_labels": labels}))
    with server.client() as client:
        typed = client.classify_image(model=ZERO_SHOT, images=IMAGES, candidate_labels=labels)
    assert output(response, "label").shape == (len(IMAGES), len(labels))
    assert output(response, "label").tolist() == [[x.label for x in r.labels] for r in typed]
    np.testing.assert_array_equal(output(response, "score"), [[x.score for x in r.labels] for r in typed])


def test_image_encodes_like_encode_image(stub, server):
    response = stub.ModelInfer(image_request(ENCODER, IMAGES, normalize=True, pooling="mean"))
    with server.client() as client:
        typed = client.encode_image(model=ENCODER, images=IMAGES, normalize=True, pooling="mean")
    np.testing.assert_array_equal(output(response, "embedding"), np.array(list(typed), dtype=np.float32))


def test_image_reconstructs_like_reconstruct_image(stub, server):
    response = stub.ModelInfer(image_request(RECONSTRUCTOR, IMAGES, seed=3, mask_ratio="0.5"))
    with server.client() as client:
        typed = client.reconstruct_image(model=RECONSTRUCTOR, images=IMAGES, seed=3, mask_ratio=0.5)
    names = [o.name for o in response.outputs]
    pngs = split_bytes("image", response.raw_output_contents[names.index("image")])
    reconstructions = split_bytes("reconstruction", response.raw_output_contents[names.index("reconstruction")])
    assert pngs == [r.image for r in typed]
    assert reconstructions == [r.reconstruction.tobytes() for r in typed]
    assert output(response, "masked_patches").tolist() == [r.masked_patches for r in typed]
    assert output(response, "shape").tolist() == [[3, 32, 32]] * len(IMAGES)
    np.testing.assert_array_equal(output(response, "loss"), [r.loss for r in typed])


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        (image_request(CLASSIFIER, [b"not an image"]), "image 0 (12 bytes) is not a PNG"),
        (image_request(CLASSIFIER, IMAGES, {"labels": ["a"]}), "takes the BYTES inputs ['image', 'candidate_labels'],"),
        (image_request(CLASSIFIER, IMAGES, top_k="three"), "parameter 'top_k'"),
        (image_request(ZERO_SHOT, IMAGES), "send the candidate_labels"),
        (image_request(RECONSTRUCTOR, IMAGES, mask_ratio="2"), "mask_ratio 2.0 is not between 0 and 1"),
    ],
)
def test_bad_image_requests_are_refused(stub, request_, words):
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(request_)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in refused.value.details()


def test_image_must_be_bytes(stub):
    request = v2.ModelInferRequest(model_name=CLASSIFIER)
    request.inputs.add(name="image", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'image' must be BYTES (encoded image files)" in refused.value.details()
