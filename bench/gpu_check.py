"""`make gpu-check`: the GPU path, checked on a lent GPU in one run of a few minutes (docs/gpu.md).

    python -m bench.gpu_check [--device cuda|cpu] [--kinds KIND ...] [--work DIR] [--results DIR]

1. Fails fast: the CUDA provider is created first (a one-node session, as `onnxserve serve` does at
   start); when it cannot be, the check stops with the reason before building anything (exit 2).
2. Builds tiny random checkpoints (tests/checkpoints.py: BERT feature extraction and
   classification, Llama, Gemma 3, GPT-2, T5) and exports each in fp32 and fp16 (`--force`: the
   agreement is measured here).
3. Serves them side by side from three `onnxserve serve` processes: the reference on the CPU in
   fp32, and the device under test in fp32 and in fp16.
4. Compares each device server with the reference: Encode (cosine at least MIN_COSINE, no NaN),
   Classify labels (near-ties aside), greedy and beam-search ids (the common prefix per prompt; the
   share of prompts agreeing whole at least the generative gate's bound for the precision), and
   CONCURRENT generations of different lengths in flight at once, each equal to its solo run on that
   server. On CUDA a fused decoder in fp32 must be refused, naming GroupQueryAttention.
5. Places every exported graph on the device under test with ONNX Runtime's verbose log (in a child
   process): an op doing the model's arithmetic (HEAVY_OPS) left on the CPU fails, Memcpy nodes are
   counted. A refused fp32 fused decoder must show why: its GroupQueryAttention on the CPU.
6. Counts in each server's log: Memcpy nodes added, nodes "not assigned" to the preferred provider,
   and models whose requests are not merged (batch drift over the limit); an unmerged model fails.

`--device cpu` runs the same check with the CPU as the device under test and no GPU: it exercises
every step and comparison (tests/test_gpu_check.py runs it). One line per check is printed, and
RESULTS/gpu-check-<device>-<time>.json is written; the exit code is 0 when every check passed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxserve.client import Client
from onnxserve.export.generative_gate import BOUNDS, common_prefix
from onnxserve.export.validate import TEXTS
from onnxserve.server.runtime.sessions import CPU, CUDA, cuda_problem, cuda_provider_options

from bench.engines import server_process
from onnxserve.repository import read_manifest, version_dirs
from tests.generation_reference import PROMPTS

RESULTS = Path(__file__).parent / "results"
ENCODE, CLASSIFY, GENERATE = "encode", "classify", "generate"
KINDS = {
    "bert-feature-extraction": ENCODE,
    "bert-sequence-classification": CLASSIFY,
    "llama-causal-lm": GENERATE,
    "gemma3-causal-lm": GENERATE,
    "gpt2-causal-lm": GENERATE,
    "t5-seq2seq": GENERATE,
}
PRECISIONS = ("fp32", "fp16")
# The exporter's fp16 gate is a min cosine of 0.999 (export/validate.py); fp32 on another
# provider only reorders sums.
MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999}
NEAR_TIE = 0.01  # a label whose reference score leads by less may flip on rounding alone
NEW_TOKENS = 16
BEAMS = 3
CONCURRENT = 12
# Ops that do a model's arithmetic: on the device under test none may run on the CPU (ONNX Runtime
# puts shape computations there on purpose, which is fine).
HEAVY_OPS = frozenset({
    "Attention", "BiasGelu", "EmbedLayerNormalization", "FastGelu", "FusedMatMul", "GatherBlockQuantized",
    "Gelu", "Gemm", "GroupQueryAttention", "LayerNormalization", "MatMul", "MatMulNBits",
    "MultiHeadAttention", "SimplifiedLayerNormalization", "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization", "Softmax",
})  # fmt: skip
PROVIDERS = {"cuda": CUDA, "cpu": CPU}
_PLACED = re.compile(r"(?:All nodes|Node\(s\)) placed on \[(\w+)\]\. Number of nodes: (\d+)")
_NODE = re.compile(r"VerifyEachNodeIsAssignedToAnEp\]\s{3}(\w+) \(")
_MEMCPY = re.compile(r"(\d+) Memcpy nodes are added to the graph")
LOG_FINDINGS = {
    "memcpy nodes": _MEMCPY,
    "not assigned": re.compile(r"were not assigned to the preferred execution providers"),
    "unmerged": re.compile(r"will not be batched together"),
}


@dataclass(frozen=True)
class Serving:
    """One server: the reference, or the device under test in one precision."""

    name: str
    device: str
    precision: str

    def flags(self) -> list[str]:
        return ["--device", self.device, "--precision", self.precision]


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class Report:
    device: str
    checks: list[Check] = field(default_factory=list)
    logs: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, name: str, passed: bool, detail: str) -> None:
        self.checks.append(Check(name, passed, detail))
        print(f"{'PASS' if passed else 'FAIL'}  {name}: {detail}", flush=True)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)


# --- 1. the provider, and 2. the models --------------------------------------------------------------


def require_device(device: str) -> None:
    """Stops at once, naming what is missing, when the device under test cannot run."""
    if device == "cuda" and (problem := cuda_problem()) is not None:
        print(f"gpu-check: the CUDA provider cannot run here: {problem}", file=sys.stderr)
        raise SystemExit(2)


def export_all(kinds: Sequence[str], work: Path) -> Path:
    """Each kind's tiny checkpoint exported in fp32 and fp16 into WORK/repository."""
    from onnxserve.export.exporter import export_model

    from tests.checkpoints import build_checkpoint

    repository = work / "repository"
    for kind in kinds:
        print(f"exporting {kind} ({', '.join(PRECISIONS)})", flush=True)
        source = build_checkpoint(kind, work / "checkpoints" / kind)
        export_model(str(source), repository, name=kind, precisions=PRECISIONS, force=True, show_progress=False)
    return repository


def version_dir(repository: Path, kind: str) -> Path:
    versions = version_dirs(repository / kind)
    return versions[max(versions)]


def graphs(repository: Path, kind: str, precision: str) -> list[Path]:
    """The variant's ONNX files."""
    directory = version_dir(repository, kind)
    [variant] = [v for v in read_manifest(directory).variants if f".{precision}." in v.files[0].path]
    return [directory / f.path for f in variant.files]


def is_fused(repository: Path, kind: str) -> bool:
    """Whether the kind was exported as the fused decoder graph (it has a seqlens_k input)."""
    import onnx

    model = onnx.load(str(graphs(repository, kind, "fp32")[0]), load_external_data=False)
    return any(graph_input.name == "seqlens_k" for graph_input in model.graph.input)


def refused(serving: Serving, fused: bool) -> bool:
    """A fused decoder whose attention is not fp16 is refused on CUDA (no fp32 GroupQueryAttention kernel)."""
    return fused and serving.device == "cuda" and serving.precision != "fp16"


# --- 4. the comparisons --------------------------------------------------------------------------


def compare_encode(report: Report, kind: str, serving: Serving, reference: Client, device: Client) -> None:
    expected = np.array(list(reference.encode(model=kind, texts=TEXTS)), dtype=np.float64)
    got = np.array(list(device.encode(model=kind, texts=TEXTS)), dtype=np.float64)
    cosines = (expected * got).sum(1) / (np.linalg.norm(expected, axis=1) * np.linalg.norm(got, axis=1))
    finite = bool(np.isfinite(got).all())
    bound = MIN_COSINE[serving.precision]
    detail = f"min cosine {np.nanmin(cosines):.6f} (at least {bound}), {'no NaN' if finite else 'NaN or inf found'}"
    report.add(f"{serving.name} {kind} Encode", finite and bool(np.nanmin(cosines) >= bound), detail)


def compare_classify(report: Report, kind: str, serving: Serving, reference: Client, device: Client) -> None:
    expected = reference.classify(model=kind, texts=TEXTS, top_k=2)
    got = device.classify(model=kind, texts=TEXTS, top_k=1)
    flipped = [
        index for index, (e, g) in enumerate(zip(expected, got, strict=True))
        if g.label != e.label and e.labels[0].score - e.labels[1].score >= NEAR_TIE
    ]  # fmt: skip
    finite = all(np.isfinite(g.score) for g in got)
    detail = f"{len(TEXTS) - len(flipped)} of {len(TEXTS)} labels agree (near-ties aside)" + (
        "" if finite else ", a score is NaN"
    )
    report.add(f"{serving.name} {kind} Classify", finite and not flipped, detail)


def token_ids(client: Client, kind: str, prompts: Sequence[str], **settings: object) -> list[list[int]]:
    settings = {"max_new_tokens": NEW_TOKENS, **settings}
    return [list(result.token_ids) for result in client.generate(model=kind, prompts=list(prompts), **settings)]


def compare_generation(report: Report, kind: str, serving: Serving, reference: Client, device: Client) -> None:
    """Greedy and beam-search ids against the reference's: the common prefix per prompt, and the
    share agreeing whole against the generative gate's bound for the precision."""
    needed = BOUNDS[serving.precision].min_full_agreement
    for mode, settings in (("greedy", {}), (f"beams={BEAMS}", {"num_beams": BEAMS})):
        expected = token_ids(reference, kind, PROMPTS, **settings)
        got = token_ids(device, kind, PROMPTS, **settings)
        prefixes = [common_prefix(g, e) for g, e in zip(got, expected, strict=True)]
        whole = sum(p == len(e) == len(g) for p, e, g in zip(prefixes, expected, got, strict=True))
        detail = f"common prefixes {prefixes} of {[len(e) for e in expected]}; {whole} whole (at least {needed:.0%})"
        report.add(f"{serving.name} {kind} {mode}", whole >= needed * len(PROMPTS), detail)


def compare_concurrent(report: Report, kind: str, serving: Serving, device: Client) -> None:
    """CONCURRENT generations of different lengths in flight together, each equal to its solo run
    (fused decoders share their decode steps: continuous batching)."""
    requests = [(PROMPTS[index % len(PROMPTS)], 4 + 2 * index) for index in range(CONCURRENT)]
    solo = [token_ids(device, kind, [prompt], max_new_tokens=n)[0] for prompt, n in requests]
    with ThreadPoolExecutor(CONCURRENT) as pool:
        together = list(pool.map(lambda r: token_ids(device, kind, [r[0]], max_new_tokens=r[1])[0], requests))
    differing = [index for index, (a, b) in enumerate(zip(solo, together, strict=True)) if a != b]
    detail = f"{CONCURRENT - len(differing)} of {CONCURRENT} equal their solo runs" + (
        f" (differing: {differing})" if differing else ""
    )
    report.add(f"{serving.name} {kind} {CONCURRENT} concurrent", not differing, detail)


def check_refusal(report: Report, kind: str, serving: Serving, device: Client) -> None:
    """The model must end FAILED, its reason naming GroupQueryAttention."""
    deadline = time.monotonic() + 120
    info = device.get_model(kind)
    while info.state.lower().endswith("loading") and time.monotonic() < deadline:
        time.sleep(0.5)
        info = device.get_model(kind)
    passed = info.state.lower().endswith("failed") and "GroupQueryAttention" in info.state_reason
    report.add(f"{serving.name} {kind} refused", passed, f"{info.state}: {info.state_reason[:160]}")


def compare_served(
    report: Report, repository: Path, kinds: Sequence[str], servings: list[Serving], targets: dict[str, str]
) -> None:
    with ExitStack() as stack:
        clients = {name: stack.enter_context(Client(target, timeout=300)) for name, target in targets.items()}
        reference = clients["reference"]
        for serving in servings[1:]:
            device = clients[serving.name]
            for kind in kinds:
                if refused(serving, is_fused(repository, kind)):
                    check_refusal(report, kind, serving, device)
                    continue
                # The provider, and the precision: the server's load-time check falls back to fp32
                # when a variant misses the export's gate on this machine.
                info = device.get_model(kind)
                want = (PROVIDERS[serving.device], serving.precision)
                report.add(
                    f"{serving.name} {kind} provider", (info.execution_provider, info.precision) == want,
                    f"{info.execution_provider} {info.precision} (want {' '.join(want)})",
                )  # fmt: skip
                task = KINDS[kind]
                if task == ENCODE:
                    compare_encode(report, kind, serving, reference, device)
                elif task == CLASSIFY:
                    compare_classify(report, kind, serving, reference, device)
                else:
                    compare_generation(report, kind, serving, reference, device)
                    compare_concurrent(report, kind, serving, device)


# --- 5. node placement ------------------------------------------------------------------------------


def place(graph: Path, device: str) -> None:
    """In a child process: creates the session with ONNX Runtime's verbose log, which lists where
    every node was placed (on stderr, which the parent reads)."""
    options = ort.SessionOptions()
    options.log_severity_level = 0
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers: list = [(CUDA, cuda_provider_options(0)), CPU] if device == "cuda" else [CPU]
    ort.InferenceSession(str(graph), options, providers=providers)


@dataclass
class Placement:
    """Op types per provider (`*` counts nodes whose types the log did not list), Memcpy nodes added."""

    ops: dict[str, Counter] = field(default_factory=dict)
    memcpy: int = 0


def parse_placement(log: str) -> Placement:
    """Reads ONNX Runtime's verbose session log: "All nodes placed on [P]. Number of nodes: N", or
    per provider "Node(s) placed on [P]. Number of nodes: N" followed by one "  OpType (name)" line
    per node; and "N Memcpy nodes are added to the graph"."""
    placement = Placement()
    provider = None
    for line in log.splitlines():
        if header := _PLACED.search(line):
            provider = header[1]
            placement.ops.setdefault(provider, Counter())
            if "All nodes" in line:
                placement.ops[provider]["*"] += int(header[2])
        elif (node := _NODE.search(line)) and provider is not None:
            placement.ops[provider][node[1]] += 1
        if memcpy := _MEMCPY.search(line):
            placement.memcpy += int(memcpy[1])
    return placement


def judge_placement(placement: Placement, device: str, fused_refused: bool) -> tuple[bool, str]:
    """Heavy ops must all be on the device under test; for a refused fp32 fused decoder, the
    reason must show: its GroupQueryAttention on the CPU."""
    if not placement.ops:
        return False, "ONNX Runtime logged no placements"
    on_cpu = placement.ops.get(CPU, Counter()) if device == "cuda" else Counter()
    heavy = sorted(op for op in on_cpu if op in HEAVY_OPS)
    summary = "; ".join(f"{p}: {sum(c.values())} nodes" for p, c in placement.ops.items())
    summary += f"; {placement.memcpy} Memcpy nodes added"
    if fused_refused:
        return "GroupQueryAttention" in heavy, f"{summary}; on the CPU: {heavy or 'nothing heavy'} (expected: GQA)"
    return not heavy, f"{summary}; heavy ops on the CPU: {heavy or 'none'}"


def check_placements(report: Report, repository: Path, kinds: Sequence[str], device: str) -> None:
    for kind in kinds:
        fused = is_fused(repository, kind)
        for precision in PRECISIONS:
            for graph in graphs(repository, kind, precision):
                child = [sys.executable, "-m", "bench.gpu_check", "--place", str(graph), "--device", device]
                done = subprocess.run(child, capture_output=True, text=True, errors="replace", timeout=600)
                placement = parse_placement(done.stderr)
                passed, detail = judge_placement(placement, device, refused(Serving("", device, precision), fused))
                if done.returncode != 0:
                    passed, detail = False, f"the session failed (exit {done.returncode}): {done.stderr[-300:]}"
                report.add(f"placement {kind} {graph.name}", passed, detail)


# --- 6. the servers' logs ---------------------------------------------------------------------------


def log_findings(text: str) -> dict[str, int]:
    """Counts in a server's log: Memcpy nodes added (their number), and lines saying that nodes
    were not assigned to the preferred provider or that a model's requests are not merged."""
    counts = {}
    for name, pattern in LOG_FINDINGS.items():
        found = pattern.findall(text)
        counts[name] = sum(int(n) for n in found) if pattern is _MEMCPY else len(found)
    return counts


def check_logs(report: Report, logs: dict[str, Path]) -> None:
    for name, path in logs.items():
        counts = log_findings(path.read_text(errors="replace"))
        report.logs[name] = counts
        detail = ", ".join(f"{key}: {value}" for key, value in counts.items()) + f" ({path})"
        report.add(f"{name} server log", counts["unmerged"] == 0, detail)


# --- the run ----------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> Report:
    require_device(args.device)
    report = Report(args.device)
    servings = [Serving("reference", "cpu", "fp32")]
    servings += [Serving(f"{args.device}-{p}", args.device, p) for p in PRECISIONS]
    repository = export_all(args.kinds, args.work)
    fused = {kind: is_fused(repository, kind) for kind in args.kinds}
    logs = {serving.name: args.work / f"{serving.name}.log" for serving in servings}
    with ExitStack() as stack:
        targets = {}
        for serving in servings:
            serving_kinds = [kind for kind in args.kinds if not refused(serving, fused[kind])]
            server = server_process(repository, serving_kinds, serving.flags(), logs[serving.name])
            targets[serving.name] = stack.enter_context(server)
        compare_served(report, repository, args.kinds, servings, targets)
    check_placements(report, repository, args.kinds, args.device)
    check_logs(report, logs)
    return report


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="the device under test")
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    parser.add_argument("--work", type=Path, help="checkpoints, exports, server logs (default: a new temp folder)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--place", type=Path, help=argparse.SUPPRESS)  # the child process of check_placements
    args = parser.parse_args(argv)
    args.work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    if args.place:
        place(args.place, args.device)
        return
    started = time.time()
    report = run(args)
    args.results.mkdir(parents=True, exist_ok=True)
    output = args.results / f"gpu-check-{args.device}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    summary = {**asdict(report), "passed": report.passed, "seconds": round(time.time() - started, 1)}
    output.write_text(json.dumps(summary, indent=2))
    failed = [check.name for check in report.checks if not check.passed]
    print(f"\n{len(report.checks) - len(failed)} of {len(report.checks)} checks passed; results in {output}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
