"""Loading one model version: its variant, sessions, tokenizer and its task's pipeline."""

from __future__ import annotations

import logging
from pathlib import Path

from onnxserve.server.config.settings import ModelSettings
from onnxserve.server.errors import ModelLoadError
from onnxserve.server.models.loaded import LoadedModel
from onnxserve.server.quality.probes import PROBES_FILE_SUFFIX, ProbeError, Probes, read_probes
from onnxserve.server.runtime.machine import describe, this_machine
from onnxserve.server.runtime.memory import release_freed_memory
from onnxserve.server.runtime.sessions import Session, SessionSettings
from onnxserve.server.runtime.tokenizer import TextTokenizer
from onnxserve.server.tasks.base import Executors, ModelResources
from onnxserve.server.tasks.registration import TaskRegistration, registration_for, task_name

from onnxserve.enums import short_name, short_names
from onnxserve.repository import TOKENIZER_FILE, RepositoryError, read_manifest, verify_files
from onnxserve.v1 import common_pb2, manifest_pb2, models_pb2

log = logging.getLogger(__name__)

PRECISIONS = short_names(common_pb2.Precision)


def choose_variant(manifest: manifest_pb2.Manifest, precision: str, device: str) -> manifest_pb2.Variant:
    """The variant to serve. `auto` follows the device: fp16 on CUDA, int8 on the CPU (int8 does
    not help on the CUDA provider), falling back to fp32 when the preferred one was not exported.
    int4 (decoders) is served only when asked for, or when it is all there is: it trades quality
    for speed, and its gate bounds perplexity rather than greedy agreement."""
    variants = {v.precision: v for v in manifest.variants}
    if precision != "auto":
        wanted = PRECISIONS.get(precision)
        if wanted is None:
            raise ModelLoadError(f"unknown precision {precision!r}: use auto, {', '.join(PRECISIONS)}")
        if wanted not in variants:
            held = ", ".join(short_name(common_pb2.Precision, p) for p in variants) or "none"
            raise ModelLoadError(f"precision {precision} was asked for but the repository holds {held}")
        return variants[wanted]
    preferred = common_pb2.PRECISION_FP16 if device == "cuda" else common_pb2.PRECISION_INT8
    for candidate in (preferred, common_pb2.PRECISION_FP32, *variants):
        if candidate in variants:
            return variants[candidate]
    raise ModelLoadError("the manifest lists no variants")


def load_model(
    name: str,
    version: int,
    directory: Path,
    device: str,
    settings: ModelSettings,
    executors: Executors,
) -> LoadedModel:
    """Loads a version; a failure is kept in the returned model's state, never raised."""
    model = LoadedModel(name=name, version=version, directory=directory, executors=executors, settings=settings)
    try:
        _load_into(model, device)
    except (ModelLoadError, RepositoryError, OSError) as error:
        model.state, model.reason = models_pb2.MODEL_STATE_FAILED, str(error)
        log.error("model %s version %d failed to load: %s", name, version, error)
        return model
    model.state = models_pb2.MODEL_STATE_READY
    log.info(
        "model %s version %d ready: %s, %s on %s",
        name,
        version,
        task_name(model.task),
        short_name(common_pb2.Precision, model.precision),
        model.execution_provider,
    )
    return model


def _load_into(model: LoadedModel, device: str) -> None:
    manifest = read_manifest(model.directory)
    model.manifest = manifest
    variant = choose_variant(manifest, model.settings.precision, device)
    if device == "cuda" and model.settings.precision == "auto" and variant.precision != common_pb2.PRECISION_FP16:
        log.warning(
            "model %s version %d: no fp16 variant, so CUDA serves %s (export leaves out a variant that misses "
            "its gates or that it cannot run: fp16 of some graphs on a machine without a GPU)",
            model.name, model.version, common_pb2.Precision.Name(variant.precision),
        )
    session_settings = SessionSettings(
        device=device,
        intra_op_threads=model.settings.intra_op_threads,
        inter_op_threads=model.settings.inter_op_threads,
    )
    registration = registration_for(manifest.task)
    # The tokenizer first, its parse's garbage released before the sessions load on top of it.
    tokenizer = _tokenizer(model.directory, manifest, registration)
    release_freed_memory()
    probes = _read_probes(model.directory, manifest)
    for candidate in _fallbacks(manifest, variant):
        sessions = _open_sessions(model.directory, candidate, session_settings)
        machine = describe(this_machine(next(iter(sessions.values())).provider))
        if probes is None or _accepted(model, candidate, _check(probes, sessions, candidate), machine):
            variant = candidate
            break
    else:
        refused = "; ".join(_refusal(r) for r in model.refused_variants)
        raise ModelLoadError(f"every variant missed the export's gate on this machine ({machine}): {refused}")
    release_freed_memory()
    model.tokenizer = tokenizer
    model.precision = variant.precision
    model.execution_provider = next(iter(sessions.values())).provider
    if registration is not None:  # else the model serves its tokenizer only
        resources = ModelResources(
            model.name,
            manifest,
            model.tokenizer,
            sessions,
            model.executors,
            model.settings,
            variant.precision,
            model.directory,
        )
        pipeline = registration.pipeline(resources)
        pipeline.open()
        model.pipeline = pipeline


def _tokenizer(
    directory: Path, manifest: manifest_pb2.Manifest, registration: TaskRegistration | None
) -> TextTokenizer | None:
    """The model's one tokenizer. Image-only and audio-only tasks have none, but where the
    checkpoint's export took text too (CLIP's towers under image-feature-extraction)."""
    tokenizer_path = directory / TOKENIZER_FILE
    if registration is not None and "text" not in registration.inputs and not tokenizer_path.is_file():
        return None
    if not tokenizer_path.is_file():
        raise ModelLoadError(f"{tokenizer_path} is missing")
    return TextTokenizer(tokenizer_path, manifest)


def _fallbacks(manifest: manifest_pb2.Manifest, chosen: manifest_pb2.Variant) -> list[manifest_pb2.Variant]:
    """The chosen variant, then fp32 should the chosen one miss its gate here."""
    fp32 = [v for v in manifest.variants if v.precision == common_pb2.PRECISION_FP32 and v is not chosen]
    return [chosen, *fp32]


def _open_sessions(
    directory: Path, variant: manifest_pb2.Variant, settings: SessionSettings
) -> dict[str, Session]:
    graphs = {f.role: _inside(directory, f.path) for f in variant.files}
    verify_files(directory, variant.files)  # before any session reads them; load_model runs off the loop
    return {role: Session(path, settings) for role, path in graphs.items()}


def _read_probes(directory: Path, manifest: manifest_pb2.Manifest) -> Probes | None:
    """The export's probes, checked against their SHA-256; None for exports made before probes."""
    if not manifest.HasField("probes"):
        log.info("model version %s has no probes (exported before they were written): not checked at load", directory)
        return None
    _inside(directory, manifest.probes.path, PROBES_FILE_SUFFIX)
    verify_files(directory, [manifest.probes])
    try:
        return read_probes(directory / manifest.probes.path)
    except ProbeError as error:
        raise ModelLoadError(str(error)) from error


def _check(probes: Probes, sessions: dict[str, Session], variant: manifest_pb2.Variant) -> manifest_pb2.Validation:
    """The variant's figures on the probes, on this machine; a run that fails is a miss, in words."""
    precision = short_name(common_pb2.Precision, variant.precision)
    try:
        return probes.check(sessions, precision)
    except KeyError:
        return manifest_pb2.Validation(failures=[f"the probes hold no gate for {precision}"])
    except Exception as error:  # onnxruntime raises its own untyped exceptions
        return manifest_pb2.Validation(failures=[f"the probes could not run: {error}"])


def _accepted(
    model: LoadedModel, variant: manifest_pb2.Variant, check: manifest_pb2.Validation, machine: str
) -> bool:
    """Whether to serve the variant after its check on `machine`; a refusal is kept for GetModel
    and the metrics."""
    precision = short_name(common_pb2.Precision, variant.precision)
    if check.passed:
        model.load_check = check
        return True
    refusal = models_pb2.RefusedVariant(precision=variant.precision, load_check=check)
    if model.settings.serve_refused_variants:
        model.load_check = check
        log.warning(
            "model %s version %d: the %s variant misses the export's gate on this machine (%s): %s; "
            "served anyway, as serve_refused_variants asks",
            model.name, model.version, precision, machine, "; ".join(check.failures),
        )  # fmt: skip
        return True
    model.refused_variants.append(refusal)
    log.warning(
        "model %s version %d: refused the %s variant, which misses the export's gate on this machine (%s): %s",
        model.name, model.version, precision, machine, "; ".join(check.failures),
    )  # fmt: skip
    return False


def _refusal(refused: models_pb2.RefusedVariant) -> str:
    return f"{short_name(common_pb2.Precision, refused.precision)}: {'; '.join(refused.load_check.failures)}"


def _inside(directory: Path, relative: str, suffix: str = ".onnx") -> Path:
    """Resolves a manifest's file name, refusing paths that leave the version folder, and files
    other than ONNX graphs (and the .npz probes, read without unpickling): nothing that could carry
    a pickle is ever loaded."""
    path = (directory / relative).resolve()
    if directory.resolve() not in path.parents:
        raise ModelLoadError(f"manifest file {relative!r} points outside its version folder")
    if path.suffix != suffix:
        raise ModelLoadError(f"manifest file {relative!r} is not a {suffix} file as its role asks")
    return path
