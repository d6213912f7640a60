"""The tasks an export can serve (those whose registration has an export spec), and detection from
a checkpoint's config.json (or a sentence-transformers folder)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from onnxserve.export.errors import ExportError
from onnxserve.server.tasks.registration import ExportSpec, TaskRegistration, registrations
from transformers import PretrainedConfig


@dataclass(frozen=True)
class TaskSpec:
    """One exportable task: its registration (server/tasks/registration.py), as the exporter reads it."""

    registration: TaskRegistration

    @property
    def name(self) -> str:
        return self.registration.name

    @property
    def proto(self) -> int:
        return self.registration.task

    @property
    def export(self) -> ExportSpec:
        export = self.registration.export
        if export is None:
            raise ExportError(f"task {self.name} is served but not exported by onnxserve export")
        return export

    @property
    def optimum_task(self) -> str:
        return self.export.optimum_task

    @property
    def auto_class(self) -> str | tuple[str, ...]:
        """The transformers class that loads the PyTorch reference."""
        return self.export.auto_class

    @property
    def graphs(self) -> Mapping[str, tuple[str, ...]]:
        """Each role's files as optimum's exporter writes them: one file, or a decoder and a
        decoder with past to merge."""
        return self.export.graphs

    @property
    def generative(self) -> bool:
        return self.export.generation_config


TASKS: dict[str, TaskSpec] = {r.name: TaskSpec(r) for r in registrations() if r.export is not None}

# Architecture class-name endings, most specific first.
_HEADS = (
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"),
    ("ForMultipleChoice", "multiple-choice"),
    ("ForImageClassification", "image-classification"),
    ("ForObjectDetection", "object-detection"),
    ("ForSemanticSegmentation", "image-segmentation"),
    ("ForSegmentation", "image-segmentation"),  # DETR's panoptic head
    ("ForMaskedImageModeling", "masked-image-modeling"),
    ("ForCausalLM", "text-generation"),
)
# Image-text models whose checkpoints serve zero-shot image classification.
_ZERO_SHOT_MODEL_TYPES = ("clip", "siglip")
# CLIP is exported as its two towers by default: one version then answers Encode, EncodeImage and
# zero-shot ClassifyImage, and a label's text is embedded once rather than once per image.
_TWO_TOWER_MODEL_TYPES = ("clip",)
# The model types whose graphs a task's post-processing is built for, where optimum exports others
# for the same task: DETR-style detection heads (softmax with "no object"; RT-DETR and D-FINE score
# with sigmoids), and segmentation heads with per-class logits or DETR's panoptic head (MaskFormer's
# queries are not built).
_SERVED_MODEL_TYPES = {
    "zero-shot-image-classification": _ZERO_SHOT_MODEL_TYPES,
    "object-detection": ("detr", "yolos", "table-transformer"),
    "image-segmentation": ("segformer", "dpt", "mobilevit", "detr"),
    "automatic-speech-recognition": ("whisper", "speech_to_text"),  # features and prompts of each reproduced
}
# Heads whose task depends on whether the model is an encoder-decoder: T5ForConditionalGeneration,
# MarianMTModel, GPT2LMHeadModel, and old T5 configs' T5WithLMHeadModel.
_GENERATION_HEADS = ("ForConditionalGeneration", "MTModel", "LMHeadModel")


def task_spec(name: str) -> TaskSpec:
    spec = TASKS.get(name)
    if spec is None:
        raise ExportError(f"unknown task {name!r}: use one of {', '.join(TASKS)}")
    return spec


def detect_task(checkpoint: Path, config: PretrainedConfig) -> str:
    """The task a checkpoint was trained for, from its architecture; sentence-transformers folders
    (they have modules.json) are feature extraction whatever their architecture says."""
    if (checkpoint / "modules.json").is_file():
        return "feature-extraction"
    if config.model_type in _TWO_TOWER_MODEL_TYPES:
        return "image-feature-extraction"
    if config.model_type in _ZERO_SHOT_MODEL_TYPES:
        return "zero-shot-image-classification"
    if config.model_type == "vision-encoder-decoder":  # its architecture is VisionEncoderDecoderModel
        return "image-to-text"
    architectures = config.architectures or []
    if not architectures:
        raise ExportError(
            f"cannot detect the task: {checkpoint / 'config.json'} names no architecture; "
            f"pass the task ({', '.join(TASKS)})"
        )
    architecture = architectures[0]
    speech = _speech_task(config.model_type, architecture)
    if speech is not None:
        return speech
    for ending, task in _HEADS:
        if architecture.endswith(ending):
            return task
    if architecture.endswith(_GENERATION_HEADS):
        if config.is_encoder_decoder:
            return "text2text-generation"
        if architecture.endswith("LMHeadModel"):
            return "text-generation"
    elif architecture.endswith("Model") and "For" not in architecture:
        # An image encoder (ViTModel, Dinov2Model) ships an image processor and no tokenizer.
        vision = (checkpoint / "preprocessor_config.json").is_file() and not (checkpoint / "tokenizer.json").is_file()
        return "image-feature-extraction" if vision else "feature-extraction"
    raise ExportError(
        f"unsupported architecture {architecture}: no servable task for it; "
        f"pass a task ({', '.join(TASKS)}) if the checkpoint fits one"
    )


def _speech_task(model_type: str, architecture: str) -> str | None:
    """Speech seq2seq (Whisper, Speech2Text; check_exportable refuses the others), CTC and audio
    classification heads, by transformers' own Auto mappings: a speech model's sequence
    classification head (Wav2Vec2ForSequenceClassification) is audio classification."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES,
        MODEL_FOR_CTC_MAPPING_NAMES,
        MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES,
    )

    if MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES.get(model_type) == architecture:
        return "automatic-speech-recognition"

    if MODEL_FOR_CTC_MAPPING_NAMES.get(model_type) == architecture:
        return "ctc-speech-recognition"
    if MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES.get(model_type) == architecture:
        return "audio-classification"
    return None


def check_exportable(config: PretrainedConfig, spec: TaskSpec) -> None:
    """Refuses, before any work, what optimum's ONNX exporter cannot export."""
    import optimum.exporters.onnx.model_configs  # noqa: F401 - registers the ONNX configs
    from optimum.exporters.tasks import TasksManager

    architecture = (config.architectures or [config.model_type])[0]
    try:
        supported = TasksManager.get_supported_tasks_for_model_type(
            config.model_type, "onnx", library_name="transformers"
        )
    except KeyError:
        raise ExportError(
            f"unsupported architecture {architecture}: optimum's ONNX exporter does not know "
            f"model type {config.model_type!r}"
        ) from None
    served = _SERVED_MODEL_TYPES.get(spec.name)
    if served is not None and config.model_type not in served:
        raise ExportError(f"{spec.name} is served for {', '.join(served)} models, not {config.model_type!r} yet")
    if spec.optimum_task not in supported:
        servable = sorted({task.removesuffix("-with-past") for task in supported} & TASKS.keys())
        raise ExportError(
            f"unsupported architecture {architecture} for {spec.name}: optimum exports "
            f"{config.model_type!r} models for {', '.join(servable) or 'no servable task'}"
        )
