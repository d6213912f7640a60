"""ClassifyAudio: audio classification (wav2vec2, HuBERT sequence classification heads) as the
audio-classification pipeline does it: the waveform normalized as the feature extractor does,
the model's logits, softmax (the pipeline's default function_to_apply) and the top_k labels."""

from __future__ import annotations

from onnxserve.server.tasks.audio import AudioPipeline
from onnxserve.server.tasks.base import Prepared, RowOutputs, require_batch, softmax
from onnxserve.server.tasks.registration import ExportSpec, KServeAudio, TaskRegistration
from onnxserve.server.tasks.text_classification import ranked_labels

from onnxserve.v1 import common_pb2, inference_pb2

DEFAULT_TOP_K = 5  # the pipeline's


class AudioClassificationPipeline(AudioPipeline[inference_pb2.ClassifyAudioRequest]):
    def preprocess(self, request: inference_pb2.ClassifyAudioRequest) -> Prepared:
        require_batch(request.audios, "audios")
        return Prepared([self.input_values(waveform) for waveform in self.waveforms(request.audios)])

    def postprocess(
        self, request: inference_pb2.ClassifyAudioRequest, prepared: Prepared, outputs: list[RowOutputs]
    ) -> inference_pb2.ClassifyAudioResponse:
        labels = list(self.manifest.labels)
        top_k = request.top_k or DEFAULT_TOP_K
        response = inference_pb2.ClassifyAudioResponse()
        for row in outputs:
            response.results.add().labels.extend(ranked_labels(softmax(row["logits"]), labels, top_k))
        return response


REGISTRATION = TaskRegistration(
    name="audio-classification",
    task=common_pb2.TASK_AUDIO_CLASSIFICATION,
    pipeline=AudioClassificationPipeline,
    rpcs=frozenset({"ClassifyAudio"}),
    kserve_audio=KServeAudio("ClassifyAudio"),
    export=ExportSpec("audio-classification", "AutoModelForAudioClassification"),
    inputs="audio",
)
