"""Each task declared once. A `TaskRegistration` names everything that depends on the task: its
pipeline, the Inference RPCs it serves, how KServe v2 text requests map onto them, and how
`onnxserve export` makes and validates its variants. The server's tables (which pipeline, which
RPCs, which KServe mapping) and the exporter's choices (precisions, variant plan, validator, the
fused decoder) are all read from here, so adding a head is: its module with its registration, its
messages, its tests.

Importable without torch or transformers: the server imports it, and so does the exporter."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from google.protobuf.descriptor import Descriptor

from onnxserve.enums import short_name
from onnxserve.v1 import common_pb2, inference_pb2

if TYPE_CHECKING:
    from onnxserve.server.tasks.base import ModelResources, Pipeline

INFERENCE = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
#: RPCs that every model serves with its tokenizer, whatever its task.
TOKENIZER_RPCS = frozenset({"Tokenize", "Detokenize"})

#: The graph optimum writes for most tasks: one file, served as the role "model".
SINGLE_GRAPH: Mapping[str, tuple[str, ...]] = {"model": ("model.onnx",)}
# The seq2seq decoder is served merged: one graph with one copy of the weights for the first step
# (use_cache_branch=False) and the next ones. optimum merges its own decoders, but ONNX Runtime's
# float16 converter cannot handle the merged graph's If branches, so the exporter converts the
# two decoders it also writes and merges each precision itself.
SEQ2SEQ_GRAPHS: Mapping[str, tuple[str, ...]] = {
    "encoder": ("encoder_model.onnx",),
    "decoder": ("decoder_model.onnx", "decoder_with_past_model.onnx"),
}


@dataclass(frozen=True)
class Derivation:
    """How one variant is made: `converter` (a name the exporter maps to its function) applied to
    the `source` graph: "fp32", the served fp32 graph (fused where the task's models fuse), or
    "unfused", the optimized graph before fusion (the int8 quantizer needs standard ops to infer
    types; ONNX Runtime fuses the quantized graph itself when it loads it)."""

    converter: Literal["fp16", "int8_dynamic", "int8_weight_only", "int4_weight_only"]
    source: Literal["fp32", "unfused"]


#: Encoders: fp16 from the fp32 graph, int8 with dynamic (per-token) activation quantization.
ENCODER_VARIANTS: Mapping[str, Derivation] = {
    "fp16": Derivation("fp16", "fp32"),
    "int8": Derivation("int8_dynamic", "unfused"),
}
#: Decoders read every weight once per token: int8 and int4 quantize the weights only, from the
#: graph that is served in fp32, and activations stay fp32.
DECODER_VARIANTS: Mapping[str, Derivation] = {
    "fp16": Derivation("fp16", "fp32"),
    "int8": Derivation("int8_weight_only", "fp32"),
    "int4": Derivation("int4_weight_only", "fp32"),
}


@dataclass(frozen=True)
class HandBuilt:
    """Graphs that `onnxserve export` writes itself with torch.onnx where optimum's exporter
    cannot (CLIP's towers as two graphs; a SimMIM head that takes its mask as an input), for
    checkpoints of `model_types` ("*": any): `builder`, a name the exporter maps to its function,
    writes each role's file of `graphs`, which are then optimized and converted as optimum's are.
    `inputs`, where set, replaces the registration's for these checkpoints (CLIP's towers take text
    too, so the version ships a tokenizer)."""

    builder: Literal["clip_towers", "masked_image_modeling"]
    graphs: Mapping[str, tuple[str, ...]]
    model_types: tuple[str, ...] = ("*",)
    inputs: Literal["text", "images", "text and images"] | None = None


@dataclass(frozen=True)
class ExportSpec:
    """How `onnxserve export` makes the task's model: optimum's task name and the transformers
    class of the PyTorch reference; the graphs optimum writes per role (one file, or a decoder and
    a decoder with past to merge); the variants it can derive from fp32 and those it makes by
    default; the validator ("outputs" against PyTorch on sample inputs, or "generative": greedy
    decoding and perplexity); and whether checkpoints of the Llama family get the fused decoder
    graph instead of optimum's."""

    optimum_task: str
    auto_class: str | tuple[str, ...]  # several: the first that loads the checkpoint, as optimum tries them
    graphs: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: SINGLE_GRAPH)
    variants: Mapping[str, Derivation] = field(default_factory=lambda: ENCODER_VARIANTS)
    default_precisions: tuple[str, ...] = ("fp32", "fp16", "int8")
    validator: Literal["outputs", "generative"] = "outputs"
    fused_decoder: bool = False
    generation_config: bool = False  # the checkpoint's generation_config.json is read and shipped
    hand_built: tuple[HandBuilt, ...] = ()

    def hand_built_for(self, model_type: str) -> HandBuilt | None:
        """The graphs the exporter builds itself for this model type, if optimum's are not used."""
        return next((h for h in self.hand_built if model_type in h.model_types or "*" in h.model_types), None)

    @property
    def precisions(self) -> tuple[str, ...]:
        """Every precision the task can be exported in: fp32 and what derives from it."""
        return ("fp32", *self.variants)


@dataclass(frozen=True)
class KServeText:
    """What a KServe v2 ModelInfer with a BYTES input named `text` runs: the typed `rpc`, with
    `text` filling the request's repeated string field `field`."""

    rpc: str
    field: str


@dataclass(frozen=True)
class KServeFiles:
    """What a KServe v2 ModelInfer with a BYTES input named `input` runs: the typed `rpc`, each
    element of the input (an encoded file) filling one entry of the request's repeated `message`
    field `field`."""

    input: ClassVar[str]
    message: ClassVar[Descriptor]
    rpc: str
    field: str


@dataclass(frozen=True)
class KServeImage(KServeFiles):
    """The `image` input: encoded image files into a repeated Image field."""

    input: ClassVar[str] = "image"
    message: ClassVar[Descriptor] = inference_pb2.Image.DESCRIPTOR
    field: str = "images"


@dataclass(frozen=True)
class KServeAudio(KServeFiles):
    """The `audio` input: encoded audio files into a repeated Audio field."""

    input: ClassVar[str] = "audio"
    message: ClassVar[Descriptor] = inference_pb2.Audio.DESCRIPTOR
    field: str = "audios"


@dataclass(frozen=True)
class TaskRegistration:
    """One task: `name` as the exporter and the command spell it, `task` its Task number in the
    manifest, `pipeline` what builds its pipeline per loaded model version (a Pipeline class, or a
    function choosing one by the model: Whisper's or Speech2Text's), `rpcs` the Inference RPCs it
    serves (besides Tokenize and Detokenize, which every model serves), `kserve_text`,
    `kserve_image` and `kserve_audio` its KServe v2 text, image and audio mappings, `export` its export spec (None: not
    exported by `onnxserve export`) and `inputs` what its models take: text (they ship a
    tokenizer, and serve Tokenize and Detokenize), images (pixel_values from the manifest's
    image_processing, no tokenizer), both (CLIP), audio (features from the version's
    preprocessor_config.json, no tokenizer: CTC models ship their vocabulary, ctc_vocabulary.json)
    or text and audio (Whisper)."""

    name: str
    task: int
    pipeline: Callable[[ModelResources], Pipeline]
    rpcs: frozenset[str]
    kserve_text: KServeText | None = None
    kserve_image: KServeImage | None = None
    kserve_audio: KServeAudio | None = None
    export: ExportSpec | None = None
    inputs: Literal["text", "images", "text and images", "audio", "text and audio"] = "text"

    def __post_init__(self) -> None:
        unknown = sorted(self.rpcs - set(INFERENCE.methods_by_name))
        if unknown:
            raise ValueError(f"task {self.name}: {unknown} are not RPCs of {INFERENCE.full_name}")
        text = self.kserve_text
        if text is not None:
            self._check_mapping("text", text.rpc, text.field, lambda f: f.type == f.TYPE_STRING, "string")
        for files in (self.kserve_image, self.kserve_audio):
            if files is not None:
                fits = lambda f, files=files: f.message_type is files.message  # noqa: E731
                self._check_mapping(files.input, files.rpc, files.field, fits, files.message.name)

    def _check_mapping(self, kind: str, rpc: str, name: str, fits: Callable[[Any], bool], wanted: str) -> None:
        if rpc not in self.rpcs:
            raise ValueError(f"task {self.name}: its KServe {kind} RPC {rpc} is not one it serves")
        field = INFERENCE.methods_by_name[rpc].input_type.fields_by_name.get(name)
        if field is None or not field.is_repeated or not fits(field):
            raise ValueError(f"task {self.name}: {rpc}'s request has no repeated {wanted} field {name!r}")


_REGISTRY: dict[int, TaskRegistration] = {}


def register(registration: TaskRegistration) -> TaskRegistration:
    """Adds a task; its number and name must be new."""
    clash = next((r for r in _REGISTRY.values() if registration.name == r.name or registration.task == r.task), None)
    if clash is not None:
        raise ValueError(f"task {registration.name} ({registration.task}) clashes with {clash.name} ({clash.task})")
    _REGISTRY[registration.task] = registration
    return registration


def unregister(task: int) -> None:
    _REGISTRY.pop(task, None)


def registrations() -> Iterator[TaskRegistration]:
    return iter(list(_REGISTRY.values()))


def registration_for(task: int) -> TaskRegistration | None:
    """The registration of a manifest's task number; None for a task this server does not serve."""
    return _REGISTRY.get(task)


def task_name(task: int) -> str:
    """A task's name for messages and logs: its registration's ("text-classification"), else the
    contract's ("text_classification"), else its number."""
    registration = _REGISTRY.get(task)
    return registration.name if registration is not None else short_name(common_pb2.Task, task)
