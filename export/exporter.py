"""`onnxserve export`: a transformers checkpoint to a validated, versioned model-repository entry.

The flow: read the checkpoint (config, fast tokenizer, task) -> optimum's ONNX exporter -> graph
optimization (fp32; Llama-family causal LMs get the fused decoder graph of decoder_graph
instead) -> fp16, int8 (and, for decoders, int4) variants derived from it -> each
variant validated against PyTorch and gated -> tokenizer, generation config and manifest written
beside the ONNX files -> the hidden staging folder renamed to the next version number.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from onnxserve.export.alignment import add_alignment_graph
from onnxserve.export.audio import SpeechFiles, read_speech
from onnxserve.export.checkpoint import Checkpoint, load_config, load_tokenizer, open_source
from onnxserve.export.decoder_graph import build_decoder_graph, supports_fused_decoder
from onnxserve.export.errors import ExportError
from onnxserve.export.generative_gate import DEFAULT_GATE, GGUF_GATE, GenerativeGate, GenerativeValidator
from onnxserve.export.gguf_weights import import_gguf_weights
from onnxserve.export.hand_built import BUILDERS
from onnxserve.export.images import image_processing, load_image_processor
from onnxserve.export.manifest import describe_model, now_rfc3339
from onnxserve.export.optimize import (
    can_fuse,
    fuse,
    merge_decoders,
    move_model,
    opset,
    optimize_basic,
    remove_model,
    to_fp16,
)
from onnxserve.export.progress import Steps, quiet
from onnxserve.export.quantize import quantize_int8
from onnxserve.export.tasks import TASKS, TaskSpec, check_exportable, detect_task, task_spec
from onnxserve.export.validate import NotRunnable, Validator, validation_provider
from onnxserve.export.weight_only import RECIPES, quantize_int4_weights, quantize_int8_weights
from onnxserve.export.whisper_gate import judge_whisper_graphs
from onnxserve.export.whisper_graph import WHISPER_GRAPHS, build_whisper_graphs, supports_whisper_decoder
from onnxserve.export.writer import publish, sha256, staging
from onnxserve.server.quality.probes import PROBES_FILE, Probes, write_probes
from onnxserve.server.runtime.machine import this_machine
from onnxserve.server.tasks.registration import HandBuilt
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    WhisperForConditionalGeneration,
)

from onnxserve.enums import short_names
from onnxserve.repository import TOKENIZER_FILE, RepositoryError, validate_model_name
from onnxserve.v1 import common_pb2, manifest_pb2

__all__ = ["ExportError", "GenerativeGate", "export_model"]

PRECISIONS = short_names(common_pb2.Precision)
#: The converters a task's variant plan names (ExportSpec.variants, server/tasks/registration.py).
CONVERTERS: dict[str, Callable[[Path, Path], str]] = {
    "fp16": to_fp16,
    "int8_dynamic": quantize_int8,
    "int8_weight_only": quantize_int8_weights,
    "int4_weight_only": quantize_int4_weights,
}
#: From a GGUF, the weight-only converters' recipes apply only to what the file holds as floats.
GGUF_RECIPES = {"int8_weight_only": RECIPES["int8"], "int4_weight_only": RECIPES["int4"]}
GENERATION_CONFIG_FILE = "generation_config.json"


@dataclass
class _Model:
    """What the export reads from the checkpoint before converting anything."""

    checkpoint: Checkpoint
    spec: TaskSpec
    config: PretrainedConfig
    tokenizer: PreTrainedTokenizerFast | None  # None for vision models
    image_processor: Any  # transformers' image processor of vision models, else None
    generation: GenerationConfig | None
    manifest: manifest_pb2.Manifest  # the fields that describe the model
    hand_built: HandBuilt | None = None  # graphs the exporter builds itself rather than optimum
    speech: SpeechFiles | None = None  # speech models' feature extractor (and CTC vocabulary)

    @property
    def graphs(self) -> Mapping[str, tuple[str, ...]]:
        """Each role's files as they are written before conversion: optimum's, or the hand-built
        ones; and Whisper's fused decoder graphs beside optimum's."""
        graphs = self.spec.graphs if self.hand_built is None else self.hand_built.graphs
        return {**graphs, **WHISPER_GRAPHS} if _has_whisper_decoder(self) else graphs

    @property
    def layout(self) -> str:
        """What the validation runs and compares: the task's graphs, or the hand-built ones'."""
        return self.spec.name if self.hand_built is None else self.hand_built.builder


@dataclass
class _Variant:
    precision: str
    graphs: dict[str, Path]  # role -> ONNX file in the staging folder
    recipe: str
    validation: manifest_pb2.Validation = field(default_factory=manifest_pb2.Validation)


def export_model(
    source: str | Path,
    repository: Path,
    *,
    name: str | None = None,
    task: str | None = None,
    precisions: Sequence[str] | None = None,
    force: bool = False,
    show_progress: bool = True,
    generative_gate: GenerativeGate = DEFAULT_GATE,
) -> Path:
    """Exports SOURCE (a checkpoint folder, a Hub id or a .gguf file) into REPOSITORY/NAME as the
    next version; returns the version folder. `precisions` defaults to the task's (its
    registration's default_precisions). Variants that miss their
    validation gates (`generative_gate` for text generation) are left out with a warning (an
    ExportError when none is left) unless `force`, which writes them marked as failed."""
    source = str(source)
    if precisions is not None:
        _check_precisions(precisions)
    if name is not None:
        _check_name(name)
    if task is not None:
        task_spec(task)  # an unknown task fails before any loading
    with Steps(show_progress) as steps, ExitStack() as stack:
        with steps.step(f"reading {source}"), quiet():
            checkpoint = stack.enter_context(open_source(source))
            model = _read(checkpoint, task)
        wanted = _task_precisions(model.spec, precisions)
        model_dir = Path(repository) / _check_name(name or checkpoint.default_name)
        try:
            stage = stack.enter_context(staging(model_dir))
        except OSError as error:
            raise ExportError(f"cannot write into the model repository: {error}") from error
        variants = _make_variants(model, stage, wanted, steps)
        with steps.step("computing the PyTorch reference"), quiet():
            validator = _validator(model, generative_gate)
        variants = _validate(validator, variants, steps, force)
        # Whisper's alignment heads (word timestamps): one fp32 graph, listed in every variant.
        alignment = add_alignment_graph(model.checkpoint.path, model.config, model.generation, stage, steps)
        for variant in variants:
            variant.graphs.update(alignment)
        with steps.step("writing the version"):
            return _write(model, stage, variants, validator.probes())


def _check_precisions(precisions: Sequence[str]) -> list[str]:
    unknown = sorted(set(precisions) - PRECISIONS.keys())
    if unknown or not precisions:
        raise ExportError(f"unknown precision {', '.join(unknown) or '(none)'}: use {', '.join(PRECISIONS)}")
    return [p for p in PRECISIONS if p in precisions]


def _task_precisions(spec: TaskSpec, precisions: Sequence[str] | None) -> list[str]:
    """The precisions to make for the task: the asked ones, else the task's defaults."""
    if precisions is None:
        return list(spec.export.default_precisions)
    wanted = _check_precisions(precisions)
    for precision in wanted:
        if precision not in spec.export.precisions:
            others = [other.name for other in TASKS.values() if precision in other.export.precisions]
            made = ", ".join(spec.export.precisions)
            raise ExportError(f"{precision} is for {', '.join(others)} models; {spec.name} exports {made}")
    return wanted


def _check_name(name: str) -> str:
    try:
        return validate_model_name(name)
    except RepositoryError as error:
        raise ExportError(str(error)) from error


def _read(checkpoint: Checkpoint, task: str | None) -> _Model:
    config = load_config(checkpoint.path)
    spec = task_spec(task or detect_task(checkpoint.path, config))
    hand_built = spec.export.hand_built_for(config.model_type)
    if hand_built is None:
        check_exportable(config, spec)
    tokenizer, image_processor, processing = None, None, None
    inputs = (hand_built and hand_built.inputs) or spec.registration.inputs
    if "images" in inputs:
        image_processor = load_image_processor(checkpoint.path)
        processing = image_processing(image_processor)
    if "text" in inputs:
        tokenizer = load_tokenizer(checkpoint.path)
    speech = read_speech(checkpoint.path, spec.name, config) if "audio" in spec.registration.inputs else None
    generation = None
    if spec.generative:
        generation = (
            GenerationConfig.from_pretrained(checkpoint.path)
            if (checkpoint.path / GENERATION_CONFIG_FILE).is_file()
            else GenerationConfig.from_model_config(config)
        )
    manifest = describe_model(checkpoint, spec, config, tokenizer, generation, processing)
    return _Model(checkpoint, spec, config, tokenizer, image_processor, generation, manifest, hand_built, speech)


def _make_variants(model: _Model, stage: Path, wanted: list[str], steps: Steps) -> list[_Variant]:
    """The wanted variants' files, in the staging folder.

    Conversions run on the graphs optimum writes ("parts": one per role, or a decoder and a
    decoder with past), which are then put together per role. fp32 is always made, as the other
    variants derive from it, or from the unfused graph before it, by the task's variant plan."""
    work = stage / "optimum"
    names = [Path(file).stem for role, files in model.graphs.items() if role not in WHISPER_GRAPHS for file in files]

    def parts(kind: str) -> dict[str, Path]:
        return {name: work / f"{name}.{kind}.onnx" for name in names}

    if _has_fused_decoder(model):
        with steps.step("building the fused decoder graph (fp32)"), quiet():
            files = {"fp32": parts("fp32")}
            recipes = {"fp32": _build_fused_decoder(model, files["fp32"]["model"])}
    else:
        if model.hand_built is not None:
            with steps.step(f"exporting {model.spec.name} with torch.onnx ({model.hand_built.builder})"), quiet():
                BUILDERS[model.hand_built.builder](model.checkpoint.path, work)
        else:
            with steps.step(f"exporting {model.spec.name} with optimum"), quiet():
                _run_optimum(model, work)
        with steps.step("optimizing the graph (fp32)"):
            unfused = parts("unfused")
            sources = {name: work / f"{name}.onnx" for name in names}
            recipes = {"unfused": _convert(optimize_basic, sources, unfused)}
            files = {"unfused": unfused, "fp32": unfused}
            recipes["fp32"] = recipes["unfused"]
            if can_fuse(model.config.model_type):
                files["fp32"] = parts("fp32")
                recipes["fp32"] += "; " + _convert(fuse, unfused, files["fp32"])
    for precision, derivation in model.spec.export.variants.items():
        if precision in wanted:
            with steps.step(f"making the {precision} variant"):
                files[precision] = parts(precision)
                recipe = _convert(_converter(model, derivation.converter), files[derivation.source], files[precision])
                recipes[precision] = f"{recipes[derivation.source]}; {recipe}"
    if _has_whisper_decoder(model):
        with steps.step("building Whisper's fused decoder graphs"), quiet():
            _add_whisper_decoder(model, work, files, recipes, steps)
    variants = [
        _Variant(precision, _assemble(model.graphs, files[precision], stage, precision), recipes[precision])
        for precision in wanted
    ]
    shutil.rmtree(work)
    return variants


def _converter(model: _Model, name: str) -> Callable[[Path, Path], str]:
    """The variant plan's converter; a GGUF's weight-only variants carry the file's own blocks."""
    gguf_file = model.checkpoint.gguf_file
    if gguf_file is not None and name in GGUF_RECIPES and _has_fused_decoder(model):
        return partial(import_gguf_weights, gguf_file=gguf_file, recipe=GGUF_RECIPES[name])
    return CONVERTERS[name]


def _has_fused_decoder(model: _Model) -> bool:
    return model.spec.export.fused_decoder and supports_fused_decoder(model.config)


def _has_whisper_decoder(model: _Model) -> bool:
    return model.spec.export.fused_decoder and supports_whisper_decoder(model.config)


#: Whisper's fused graphs in int8: the decoder's weights only, as causal decoders' (a decode step
#: reads every weight for a few rows); the cross_attention graph per-token int8, as the encoder
#: (its MatMuls run over 1500 frames, where MatMulNBits took 1.0 s a row against 0.64 s for
#: Whisper base on a loaded 2-vCPU machine). Both keep a row's result free of its batchmates'.
WHISPER_INT8 = {"fused_decoder": quantize_int8_weights, "cross_attention": quantize_int8}


def _add_whisper_decoder(
    model: _Model, work: Path, files: dict[str, dict[str, Path]], recipes: dict[str, str], steps: Steps
) -> None:
    """Whisper's fused decoder and cross_attention graphs (export/whisper_graph.py), which share
    decode steps across calls, beside optimum's decoder (language detection and beam search keep
    it): in fp32, and in int8 (`WHISPER_INT8`). Each is judged by its precision's gate
    (export/whisper_gate.py); a variant whose graphs miss it, and the variants other than these
    two, serve without them (each call decoding alone on optimum's decoder)."""
    whisper = WhisperForConditionalGeneration.from_pretrained(model.checkpoint.path, dtype=torch.float32).eval()
    fp32 = {role: work / f"{role}.fp32.onnx" for role in WHISPER_GRAPHS}
    built = build_whisper_graphs(whisper, fp32["fused_decoder"], fp32["cross_attention"])
    made = {"fp32": (fp32, built)}
    if "int8" in files:
        int8 = {role: work / f"{role}.int8.onnx" for role in WHISPER_GRAPHS}
        converted = "; ".join(f"{role}: {WHISPER_INT8[role](fp32[role], int8[role])}" for role in WHISPER_GRAPHS)
        made["int8"] = (int8, f"{built}; {converted}")
    for precision, (graphs, recipe) in made.items():
        validation = judge_whisper_graphs(whisper, graphs, precision)
        figures = f"max abs diff {validation.max_abs_diff:.2g}, top-1 agreement {validation.top1_agreement:.3g}"
        if not validation.passed:
            steps.warn(f"Whisper's fused {precision} decoder left out ({'; '.join(validation.failures)})")
            continue
        files[precision] = {**files[precision], **graphs}
        recipes[precision] += f"; {recipe} (against PyTorch on the sample clips: {figures})"


def _build_fused_decoder(model: _Model, target: Path) -> str:
    """The fused decoder graph (docs/decoder-graph.md) from the fp32 PyTorch model; its rotary
    caches cover the manifest's generation max_length."""
    target.parent.mkdir(parents=True, exist_ok=True)
    causal_lm = AutoModelForCausalLM.from_pretrained(model.checkpoint.path, dtype=torch.float32).eval()
    return build_decoder_graph(causal_lm, target, max_length=model.manifest.generation.max_length)


def _convert(converter: Callable[[Path, Path], str], sources: dict[str, Path], targets: dict[str, Path]) -> str:
    """Converts each part; returns the recipe (one converter, so one recipe for all parts)."""
    recipes = [converter(sources[name], targets[name]) for name in sources]
    return recipes[0]


def _assemble(
    roles: Mapping[str, tuple[str, ...]], parts: dict[str, Path], stage: Path, precision: str
) -> dict[str, Path]:
    """Each role's final file in the staging folder: its part moved, or its two decoders merged."""
    graphs = {}
    for role, files in roles.items():
        if role in WHISPER_GRAPHS and role not in parts:
            continue  # a variant Whisper's fused decoder is not made in
        graphs[role] = target = stage / f"{role}.{precision}.onnx"
        sources = [parts[Path(file).stem] for file in files]
        if len(sources) == 1:
            move_model(sources[0], target)
        else:
            merge_decoders(*sources, target)
    return graphs


def _remove(variant: _Variant) -> None:
    for graph in variant.graphs.values():
        remove_model(graph)


def _run_optimum(model: _Model, output: Path) -> None:
    from optimum.exporters.onnx import main_export

    try:
        main_export(
            str(model.checkpoint.path),
            output,
            task=model.spec.optimum_task,
            library_name="transformers",  # sentence-transformers folders: the bare transformer
            device="cpu",
            do_validation=False,  # validated below against PyTorch, variant by variant
        )
    except (ValueError, KeyError, RuntimeError, OSError) as error:
        raise ExportError(f"optimum's ONNX exporter failed on {model.checkpoint.source}: {error}") from error
    missing = [file for files in model.spec.graphs.values() for file in files if not (output / file).is_file()]
    if missing:
        raise ExportError(f"optimum's ONNX exporter wrote no {', '.join(missing)} for {model.spec.name}")


def _validate(
    validator: Validator | GenerativeValidator, variants: list[_Variant], steps: Steps, force: bool
) -> list[_Variant]:
    """Fills each variant's validation and returns the variants to write. A variant that misses its
    gates, or that ONNX Runtime cannot run here (fp16 of some graphs on a CPU-only machine), is
    left out with a warning naming the gate and figures, or written marked as failed under
    `force`; when no variant is left, nothing is written and the error says why."""
    kept, problems = [], []
    for variant in variants:
        with steps.step(f"validating {variant.precision} against PyTorch"):
            problem = _check(validator, variant)
        if problem is None or force:
            kept.append(variant)
        else:
            _remove(variant)
        if problem is not None:
            problems.append(problem)
    if not kept:
        raise ExportError("\n".join([*problems, "no variant passed its gates: nothing was written"]))
    consequence = "written anyway (force)" if force else "left out (force writes it)"
    for problem in problems:
        steps.warn(f"{problem}; {consequence}")
    return kept


def _validator(model: _Model, generative_gate: GenerativeGate) -> Validator | GenerativeValidator:
    """Text generation is judged on greedy decoding and perplexity through the serving code, which
    runs whichever graph layout the export made; the other tasks on their outputs for sample inputs."""
    if model.spec.export.validator == "generative":
        if generative_gate is DEFAULT_GATE and model.checkpoint.gguf_file is not None and _has_fused_decoder(model):
            generative_gate = GGUF_GATE  # its weight-only variants carry the file's blocks
        return GenerativeValidator(
            model.checkpoint.path,
            model.tokenizer,
            model.generation,
            generative_gate,
            model.manifest.generation.max_length,
        )
    return Validator(
        model.spec,
        model.layout,
        model.checkpoint.path,
        model.config,
        model.tokenizer,
        model.image_processor,
        model.manifest.pooling,
        model.manifest.max_length,
    )


def _check(validator: Validator | GenerativeValidator, variant: _Variant) -> str | None:
    """Validates a variant; returns what is wrong with it, if anything."""
    try:
        variant.validation = validator.validate(variant.graphs, variant.precision)
    except NotRunnable as error:
        variant.validation.failures.append(f"not validated: {error}")
        return (
            f"the {variant.precision} variant could not be validated: {error} "
            "(export on a machine that runs it, e.g. with a CUDA GPU for fp16)"
        )
    if variant.validation.passed:
        return None
    figures = variant.validation
    failures = "; ".join(figures.failures)
    return f"the {variant.precision} variant missed its validation gates over {figures.samples} samples: {failures}"


def _write(model: _Model, stage: Path, variants: list[_Variant], probes: Probes) -> Path:
    if model.tokenizer is not None:
        model.tokenizer.backend_tokenizer.save(str(stage / TOKENIZER_FILE))
    if model.speech is not None:
        model.speech.write(stage)
    write_probes(stage / PROBES_FILE, probes)
    if model.generation is not None:
        original = model.checkpoint.path / GENERATION_CONFIG_FILE
        if original.is_file():
            shutil.copyfile(original, stage / GENERATION_CONFIG_FILE)
        else:
            model.generation.save_pretrained(stage)
    manifest = manifest_pb2.Manifest()
    manifest.CopyFrom(model.manifest)
    manifest.name = stage.parent.name
    manifest.opset = opset(next(iter(variants[0].graphs.values())))
    for variant in variants:
        manifest.variants.add(
            precision=PRECISIONS[variant.precision],
            files=[
                manifest_pb2.ModelFile(role=role, path=graph.name, sha256=sha256(graph))
                for role, graph in variant.graphs.items()
            ],
            recipe=variant.recipe,
            validation=variant.validation,
        )
    probes_file = manifest_pb2.ModelFile(role="probes", path=PROBES_FILE, sha256=sha256(stage / PROBES_FILE))
    manifest.probes.CopyFrom(probes_file)
    manifest.validated_on.CopyFrom(this_machine(validation_provider()))
    manifest.created_at = now_rfc3339()
    return publish(stage, manifest)
