"""A version's probes: a few of the export's validation inputs with PyTorch's outputs for them, and
the gate each precision was held to, in one .npz file beside the graphs (hashed in the manifest).

A variant's numbers depend on the kernels of the machine that runs it (int8 differs between AVX2
and VNNI/AMX, fp16 between the CPU and CUDA), so one that passed on the exporting machine can miss
where it is served. The server runs each variant on the probes when it loads it and applies the
same gate as the exporter; it is cheap enough for every load (a few short inputs, or 16 greedy
tokens per prompt and one short text for decoders). A variant the exporter writes passes them on
the exporting machine's kernels: decoders' probes are prefixes of the gate's own continuations and
its text, and the exporter runs the outputs' probes (a subset of the samples, whose mean figures
could differ from the whole's) before it writes a variant."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from onnxserve.server.quality.gates import Bounds, Gate, judge_generation, judge_outputs
from onnxserve.server.quality.runs import (
    MAIN_OUTPUTS,
    OUTPUT_FAMILIES,
    Batch,
    Outputs,
    common_prefix,
    greedy,
    step_perplexity,
)
from onnxserve.server.runtime.sessions import Session

from onnxserve.v1 import manifest_pb2

PROBES_FILE = "probes.npz"
PROBES_FILE_SUFFIX = ".npz"
PROBE_ROWS = 3  # per validation batch
PROBE_OUTPUT_BYTES = 2 << 20  # reference outputs per batch; big vocabularies keep fewer rows
PROBE_TOKENS = 16  # per prompt of the generative gate


class ProbeError(Exception):
    """A probe file that cannot be read as one."""


@dataclass
class OutputProbes:
    """Probes of a task judged on its outputs (every task but text generation)."""

    task: str  # the export's task name, e.g. "feature-extraction"
    pooling: int
    gates: dict[str, Gate]
    batches: list[Batch] = field(default_factory=list)
    references: list[Outputs] = field(default_factory=list)

    def check(self, sessions: dict[str, Session], precision: str) -> manifest_pb2.Validation:
        family = OUTPUT_FAMILIES[self.task]
        graphs = {role: session.session for role, session in sessions.items()}
        reference, variant = [], []
        for batch, outputs in zip(self.batches, self.references, strict=True):
            reference += family.samples(outputs, batch, self.pooling)
            variant += family.samples(family.run_onnx(graphs, batch), batch, self.pooling)
        return judge_outputs(reference, variant, family.logits, self.gates[precision])

    def meta(self) -> dict:
        return {"kind": "outputs", "task": self.task, "pooling": self.pooling, "gates": _asdicts(self.gates)}

    def arrays(self) -> dict[str, np.ndarray]:
        arrays = {}
        for index, (batch, outputs) in enumerate(zip(self.batches, self.references, strict=True)):
            arrays |= {f"batch{index}.{name}": value for name, value in batch.items()}
            arrays |= {f"reference{index}.{name}": value for name, value in outputs.items()}
        return arrays


@dataclass
class GenerationProbes:
    """Probes of a text-generation model: greedy continuations and one perplexity."""

    prompts: list[list[int]]
    continuations: list[list[int]]
    text: list[int]
    reference_perplexity: float
    eos_token_ids: list[int]
    pad_token_id: int
    bounds: dict[str, Bounds]

    def check(self, sessions: dict[str, Session], precision: str) -> manifest_pb2.Validation:
        session, eos = sessions["model"], frozenset(self.eos_token_ids)
        agreement = [
            common_prefix(greedy(session, prompt, len(expected), eos, self.pad_token_id), expected)
            for prompt, expected in zip(self.prompts, self.continuations, strict=True)
        ]
        perplexity = step_perplexity(session, self.text, self.pad_token_id)
        lengths = [len(expected) for expected in self.continuations]
        return judge_generation(agreement, lengths, perplexity, self.reference_perplexity, self.bounds[precision])

    def meta(self) -> dict:
        return {
            "kind": "generation",
            "reference_perplexity": self.reference_perplexity,
            "eos_token_ids": self.eos_token_ids,
            "pad_token_id": self.pad_token_id,
            "bounds": _asdicts(self.bounds),
        }

    def arrays(self) -> dict[str, np.ndarray]:
        arrays = {"text": np.array(self.text, np.int64)}
        for index, (prompt, expected) in enumerate(zip(self.prompts, self.continuations, strict=True)):
            arrays[f"prompt{index}"] = np.array(prompt, np.int64)
            arrays[f"continuation{index}"] = np.array(expected, np.int64)
        return arrays


Probes = OutputProbes | GenerationProbes


def probe_rows(batch: Batch, rows: int) -> Batch:
    """The first `rows` samples of a validation batch, without the columns that are padding in all of
    them (the probe's reference is computed on exactly this batch)."""
    head = {name: value[:rows] for name, value in batch.items()}
    mask = head.get("attention_mask")
    if mask is None:  # images: nothing is padding
        return head
    kept = mask.reshape(-1, mask.shape[-1]).any(axis=0)
    padded = {name for name, value in head.items() if value.ndim == mask.ndim and value.shape[-1] == kept.size}
    return {name: value[..., kept] if name in padded else value for name, value in head.items()}


def main_outputs(outputs: Outputs) -> Outputs:
    return {name: np.asarray(value, np.float32) for name, value in outputs.items() if name in MAIN_OUTPUTS}


def write_probes(path: Path, probes: Probes) -> None:
    with path.open("wb") as file:
        np.savez(file, meta=np.array(json.dumps(probes.meta())), **probes.arrays())


def read_probes(path: Path) -> Probes:
    """The probes at `path`; ProbeError naming the problem if it is not a probe file. Never unpickles."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        meta = json.loads(str(arrays.pop("meta")))
        if meta["kind"] == "generation":
            return _generation(meta, arrays)
        return _outputs(meta, arrays)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ProbeError(f"{path.name} is not a readable probe file: {error}") from error


def _outputs(meta: dict, arrays: dict[str, np.ndarray]) -> OutputProbes:
    gates = {precision: Gate(**bounds) for precision, bounds in meta["gates"].items()}
    probes = OutputProbes(meta["task"], int(meta["pooling"]), gates)
    for index in range(len({key.split(".")[0] for key in arrays if key.startswith("batch")})):
        probes.batches.append(_group(arrays, f"batch{index}."))
        probes.references.append(_group(arrays, f"reference{index}."))
    return probes


def _generation(meta: dict, arrays: dict[str, np.ndarray]) -> GenerationProbes:
    count = sum(key.startswith("prompt") for key in arrays)
    return GenerationProbes(
        prompts=[arrays[f"prompt{i}"].tolist() for i in range(count)],
        continuations=[arrays[f"continuation{i}"].tolist() for i in range(count)],
        text=arrays["text"].tolist(),
        reference_perplexity=float(meta["reference_perplexity"]),
        eos_token_ids=[int(token) for token in meta["eos_token_ids"]],
        pad_token_id=int(meta["pad_token_id"]),
        bounds={precision: Bounds(**bounds) for precision, bounds in meta["bounds"].items()},
    )


def _group(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {key.removeprefix(prefix): value for key, value in arrays.items() if key.startswith(prefix)}


def _asdicts(gates: dict[str, Gate] | dict[str, Bounds]) -> dict[str, dict]:
    return {precision: gate.as_dict() for precision, gate in gates.items()}


def truncated(continuations: Sequence[Sequence[int]]) -> list[list[int]]:
    """The probes' share of the export's greedy continuations: the first PROBE_TOKENS of every
    prompt's. A prefix agrees wherever the whole does, so a variant that met the share of fully
    agreeing prompts at export meets it on the probes on the same kernels (a subset of prompts
    would not: Gemma 3 270M's int8 agrees on 3 of 6, but on 1 of the first 3)."""
    return [list(tokens[:PROBE_TOKENS]) for tokens in continuations]
