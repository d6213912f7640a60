"""The tasks an export can serve: their names, how optimum exports them, and detection from a
checkpoint's config.json (or a sentence-transformers folder)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from onnxserve.export.errors import ExportError
from transformers import PretrainedConfig

from onnxserve.v1 import common_pb2

SINGLE_GRAPH = {"model": ("model.onnx",)}
# The seq2seq decoder is served merged: one graph with one copy of the weights for the first step
# (use_cache_branch=False) and the next ones. optimum merges its own decoders, but ONNX Runtime's
# float16 converter cannot handle the merged graph's If branches, so the exporter converts the
# two decoders it also writes and merges each precision itself.
SEQ2SEQ_GRAPHS = {"encoder": ("encoder_model.onnx",), "decoder": ("decoder_model.onnx", "decoder_with_past_model.onnx")}


@dataclass(frozen=True)
class TaskSpec:
    """One servable task. `graphs` maps each role to the files optimum's exporter writes for it:
    one file, or a decoder and a decoder with past to merge."""

    name: str
    proto: int
    optimum_task: str
    auto_class: str  # the transformers class that loads the PyTorch reference
    graphs: dict[str, tuple[str, ...]] = field(default_factory=lambda: SINGLE_GRAPH)

    @property
    def generative(self) -> bool:
        return self.proto in (common_pb2.TASK_TEXT_GENERATION, common_pb2.TASK_TEXT2TEXT_GENERATION)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("feature-extraction", common_pb2.TASK_FEATURE_EXTRACTION, "feature-extraction", "AutoModel"),
        TaskSpec(
            "text-classification",
            common_pb2.TASK_TEXT_CLASSIFICATION,
            "text-classification",
            "AutoModelForSequenceClassification",
        ),
        TaskSpec(
            "token-classification",
            common_pb2.TASK_TOKEN_CLASSIFICATION,
            "token-classification",
            "AutoModelForTokenClassification",
        ),
        TaskSpec(
            "question-answering",
            common_pb2.TASK_QUESTION_ANSWERING,
            "question-answering",
            "AutoModelForQuestionAnswering",
        ),
        TaskSpec("fill-mask", common_pb2.TASK_FILL_MASK, "fill-mask", "AutoModelForMaskedLM"),
        TaskSpec("multiple-choice", common_pb2.TASK_MULTIPLE_CHOICE, "multiple-choice", "AutoModelForMultipleChoice"),
        TaskSpec(
            "text-generation",
            common_pb2.TASK_TEXT_GENERATION,
            "text-generation-with-past",
            "AutoModelForCausalLM",
        ),
        TaskSpec(
            "text2text-generation",
            common_pb2.TASK_TEXT2TEXT_GENERATION,
            "text2text-generation-with-past",
            "AutoModelForSeq2SeqLM",
            SEQ2SEQ_GRAPHS,
        ),
    )
}

# Architecture class-name endings, most specific first.
_HEADS = (
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"),
    ("ForMultipleChoice", "multiple-choice"),
    ("ForCausalLM", "text-generation"),
)
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
    architectures = config.architectures or []
    if not architectures:
        raise ExportError(
            f"cannot detect the task: {checkpoint / 'config.json'} names no architecture; "
            f"pass the task ({', '.join(TASKS)})"
        )
    architecture = architectures[0]
    for ending, task in _HEADS:
        if architecture.endswith(ending):
            return task
    if architecture.endswith(_GENERATION_HEADS):
        if config.is_encoder_decoder:
            return "text2text-generation"
        if architecture.endswith("LMHeadModel"):
            return "text-generation"
    elif architecture.endswith("Model") and "For" not in architecture:
        return "feature-extraction"
    raise ExportError(
        f"unsupported architecture {architecture}: no servable task for it; "
        f"pass a task ({', '.join(TASKS)}) if the checkpoint fits one"
    )


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
    if spec.optimum_task not in supported:
        servable = sorted({task.removesuffix("-with-past") for task in supported} & TASKS.keys())
        raise ExportError(
            f"unsupported architecture {architecture} for {spec.name}: optimum exports "
            f"{config.model_type!r} models for {', '.join(servable) or 'no servable task'}"
        )
