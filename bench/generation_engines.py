"""The engines of `python -m bench.generation`, each in a long-lived worker process of its own, so
that the peak RSS it reports is that engine's alone and that the parent can interleave the engines'
repeats:

    python -m bench.generation_engines   (stdin: the job, then commands; stdout: one reply each)

Every line on stdin and stdout is one JSON object. The first line is the job; the worker opens its
engine and replies {"ready": <engine>}. Then {"measure": "short"} (or "long") runs one repeat of
that prompt (measure_repeat; the prompt is warmed up once before its first repeat) and replies with
its figures; {"finish": true} runs the concurrent streams, closes the engine, takes the peak RSS
and scores the perplexity, replies with those and exits. A failure ends the worker with its
traceback on stderr; its stdout carries the replies alone (see _replies_channel).

pytorch: transformers' generate() in fp32; optimum: the same generate() over ORTModelForCausalLM;
onnxserve-<precision>: `onnxserve serve` as a child of the worker, called over gRPC (its peak RSS is
the server's); llama.cpp: llama-cpp-python on the GGUF. Only the engine's own libraries are
imported, since they count in its RSS. Every engine gets the same prompt token ids: llama.cpp
takes them as ids, the others tokenize the text with the same tokenizer.json.

After the timed runs and the peak RSS, each engine scores the long prompt's ids (the same ids for
all) by its perplexity: PyTorch and optimum in one forward pass, llama.cpp in one `eval` with
`logits_all`, onnxserve through the served variant's graph one token at a time, as the server's
load-time probe does (its fused graph returns only the last position's logits). The logits of
every position take far more memory than generating does, hence after the RSS."""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

import numpy as np

MODEL = "gemma-3-270m"
WARM_UP_TOKENS = 4
PERPLEXITY_PROMPT = "long"  # the prompt whose ids every engine scores


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]  # the generated ones, EOS included when it came
    engine_seconds: float  # inside the engine: no tokenizing, no transport
    prompt_tokens: int  # as the engine tokenized the prompt
    token_times: list[float]  # per token, seconds from the call to its arrival at the caller; [] when not streamed

    @property
    def first_token_seconds(self) -> float | None:
        return self.token_times[0] if self.token_times else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        """The tokens after the first over the time from the first to the last."""
        span = self.token_times[-1] - self.token_times[0] if self.token_times else 0
        return (len(self.token_times) - 1) / span if span > 0 else None


class Engine(Protocol):
    """generate: the engine's plain call; stream: one that notes when each token arrives (the same
    call where the engine's caller sees every token anyway)."""

    concurrent: bool  # whether calls from several threads at once are served together

    def generate(self, prompt: str, prompt_ids: list[int], new_tokens: int) -> Generation: ...

    def stream(self, prompt: str, prompt_ids: list[int], new_tokens: int) -> Generation: ...


class _TokenClock:
    """A generate() streamer that notes when each token comes; its first put is the prompt."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter() - self.start)

    def end(self) -> None:
        pass


class Transformers:
    """PyTorch generate(), or (optimum) the same generate() over ONNX Runtime sessions."""

    concurrent = False

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer

    def generate(self, prompt: str, prompt_ids: list[int], new_tokens: int) -> Generation:
        import torch

        start = time.perf_counter()
        inputs = self.tokenizer(prompt, return_tensors="pt")
        clock = _TokenClock(start)
        started = time.perf_counter()
        with torch.inference_mode():
            output = self.model.generate(
                **inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
                streamer=clock,
            )  # fmt: skip
        seconds = time.perf_counter() - started
        prompt_tokens = inputs["input_ids"].shape[1]
        return Generation(output[0, prompt_tokens:].tolist(), seconds, prompt_tokens, clock.times[1:])

    stream = generate

    def logits(self, ids: list[int]) -> np.ndarray:
        """The logits at every position of `ids`, in one forward pass."""
        import torch

        tensor = torch.tensor([ids])
        with torch.inference_mode():
            return self.model(input_ids=tensor, attention_mask=torch.ones_like(tensor)).logits[0].float().numpy()


def pytorch(job: dict) -> Transformers:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(job["threads"])
    model = AutoModelForCausalLM.from_pretrained(job["checkpoint"], dtype=torch.float32).eval()
    return Transformers(model, AutoTokenizer.from_pretrained(job["checkpoint"]))


def optimum(job: dict) -> Transformers:
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    options = ort.SessionOptions()
    options.intra_op_num_threads = job["threads"]
    model = ORTModelForCausalLM.from_pretrained(
        job["optimum_export"], provider="CPUExecutionProvider", session_options=options
    )
    return Transformers(model, AutoTokenizer.from_pretrained(job["checkpoint"]))


class LlamaCpp:
    concurrent = False

    def __init__(self, job: dict, logits_all: bool = False) -> None:
        """`logits_all`: keep every position's logits (for perplexity; a context of 262k floats per
        position), not only the last one's."""
        from llama_cpp import Llama

        context = max(len(ids) for ids in job["prompt_ids"].values()) + job["new_tokens"]
        self.llama = Llama(
            model_path=job["gguf"], n_ctx=context, n_threads=job["threads"], n_threads_batch=job["threads"],
            logits_all=logits_all, verbose=False,
        )  # fmt: skip
        self.eos = set(job["eos_token_ids"])

    def generate(self, prompt: str, prompt_ids: list[int], new_tokens: int) -> Generation:
        # reset: llama-cpp-python would otherwise reuse the cache of a previous call's same prefix
        self.llama.reset()
        tokens: list[int] = []
        times: list[float] = []
        start = time.perf_counter()
        for token in self.llama.generate(prompt_ids, temp=0.0, repeat_penalty=1.0):
            tokens.append(token)
            times.append(time.perf_counter() - start)
            if token in self.eos or len(tokens) == new_tokens:
                break
        return Generation(tokens, times[-1], len(prompt_ids), times)

    stream = generate

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llama.reset()
        self.llama.eval(ids)
        return self.llama.scores[: len(ids)]

    def tokenized_otherwise(self, job: dict) -> list[str]:
        """The prompts that llama.cpp's own tokenizer (the GGUF's vocabulary) splits into other ids
        than the bench's tokenizer.json did: every engine is fed the bench's ids regardless."""
        texts = {**job["prompts"], **{f"stream {i}": text for i, text in enumerate(job["streams"])}}
        ids = {**job["prompt_ids"], **{f"stream {i}": found for i, found in enumerate(job["stream_ids"])}}
        return [name for name, text in texts.items() if self.llama.tokenize(text.encode()) != ids[name]]


class Onnxserve:
    """The served model over gRPC; the server runs only while the engine is open."""

    concurrent = True

    def __init__(self, client: Any) -> None:
        self.client = client

    def generate(self, prompt: str, prompt_ids: list[int], new_tokens: int) -> Generation:
        response = self.client.generate(model=MODEL, prompts=[prompt], max_new_tokens=new_tokens, do_sample=False)
        metadata = response.metadata
        return Generation(response[0].token_ids, metadata.inference_ns / 1e9, metadata.tokens, [])

    def stream(self, prompt: str, prompt_ids: list[int], new_tokens: int) -> Generation:
        start = time.perf_counter()
        tokens: list[int] = []
        times: list[float] = []
        chunks = self.client.generate_stream(model=MODEL, prompt=prompt, max_new_tokens=new_tokens, do_sample=False)
        for chunk in chunks:
            tokens += chunk.token_ids
            times += [time.perf_counter() - start] * len(chunk.token_ids)
        metadata = chunk.metadata
        return Generation(tokens, metadata.inference_ns / 1e9, metadata.tokens, times)


@contextmanager
def onnxserve(job: dict) -> Iterator[Onnxserve]:
    from onnxserve.client import Client

    from bench.engines import server_process

    flags = ["--device", "cpu", "--precision", job["precision"], "--threads", str(job["threads"])]
    with (
        server_process(Path(job["repository"]), [MODEL], flags, Path(job["log"])) as target,
        Client(target, timeout=1800) as client,
    ):
        yield Onnxserve(client)


OPENERS: dict[str, Callable[[dict], Engine]] = {"pytorch": pytorch, "optimum": optimum, "llama.cpp": LlamaCpp}


@contextmanager
def opened(job: dict) -> Iterator[Engine]:
    engine = job["engine"]
    if engine.startswith("onnxserve-"):
        with onnxserve(job) as served:
            yield served
        return
    yield OPENERS[engine](job)


def _timed(call: Callable[[], Generation]) -> tuple[Generation, float]:
    start = time.perf_counter()
    generation = call()
    return generation, time.perf_counter() - start


def measure_repeat(engine: Engine, prompt: str, prompt_ids: list[int], new_tokens: int) -> dict:
    """One repeat of a prompt. Prefill: the engine's own time for a one-token call (the prompt's
    forward pass and the first pick). Time to first token: that call's wall time at the caller,
    text in. Decode: in a streamed call of `new_tokens`, the tokens after the first over the time
    from the first to the last."""
    first, wall = _timed(lambda: engine.generate(prompt, prompt_ids, 1))
    full = engine.stream(prompt, prompt_ids, new_tokens)
    return {
        "prompt_tokens": first.prompt_tokens,
        "prefill_s": first.engine_seconds,
        "one_token_call_s": wall,
        "decode_tokens_per_s": full.decode_tokens_per_s,
        "streamed_first_token_s": full.first_token_seconds,
        "streamed_last_token_s": full.token_times[-1],
        "token_ids": full.token_ids,
    }


SAMPLED = ("prefill_s", "one_token_call_s", "decode_tokens_per_s", "streamed_first_token_s", "streamed_last_token_s")


def summarize(repeats: list[dict]) -> dict:
    """A prompt's figures: the medians over its repeats (measure_repeat's answers, in order), the
    first repeat's output, and every repeat's sample (index = repeat, for the paired ratios)."""
    decode = [r["decode_tokens_per_s"] for r in repeats if r["decode_tokens_per_s"] is not None]
    return {
        "prompt_tokens": repeats[0]["prompt_tokens"],
        "prefill_ms": statistics.median(r["prefill_s"] for r in repeats) * 1e3,
        "time_to_first_token_ms": statistics.median(r["one_token_call_s"] for r in repeats) * 1e3,
        "decode_tokens_per_s": statistics.median(decode) if decode else None,
        "generated_tokens": len(repeats[0]["token_ids"]),
        "token_ids": repeats[0]["token_ids"],
        "samples": {key: [r[key] for r in repeats] for key in SAMPLED},
    }


def measure_streams(engine: Engine, prompts: list[str], prompt_ids: list[list[int]], new_tokens: int,
                    concurrency: int) -> dict:  # fmt: skip
    """Every prompt once, `concurrency` calls in flight at a time: total tokens over the wall time."""
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        streams = list(pool.map(lambda pair: engine.stream(*pair, new_tokens), zip(prompts, prompt_ids, strict=True)))
    seconds = time.perf_counter() - start
    firsts = [s.first_token_seconds for s in streams if s.first_token_seconds is not None]
    tokens = sum(len(s.token_ids) for s in streams)
    return {
        "concurrency": concurrency,
        "calls": len(streams),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "time_to_first_token_p50_ms": statistics.median(firsts) * 1e3 if firsts else None,
        "token_ids": [s.token_ids for s in streams],
    }


def peak_rss_bytes(engine: str) -> int:
    """The server's peak for onnxserve (the worker's only child, waited for), else the worker's own.
    ru_maxrss is in KiB on Linux."""
    who = resource.RUSAGE_CHILDREN if engine.startswith("onnxserve-") else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss * 1024


def served_perplexity(job: dict, ids: list[int]) -> float:
    """The load-time probe's perplexity (step_perplexity) on the graph of the variant served."""
    from onnxserve.server.models.loading import choose_variant
    from onnxserve.server.quality.runs import step_perplexity
    from onnxserve.server.runtime.sessions import Session, SessionSettings

    from onnxserve.repository import read_manifest

    directory = Path(job["version_dir"])
    variant = choose_variant(read_manifest(directory), job["precision"], "cpu")
    [graph] = [directory / file.path for file in variant.files if file.role == "model"]
    return step_perplexity(Session(graph, SessionSettings(intra_op_threads=job["threads"])), ids, job["pad_token_id"])


def scored(job: dict) -> dict:
    """The engine's perplexity on the PERPLEXITY_PROMPT's ids, the engine opened anew to keep every
    position's logits; for llama.cpp, also the prompts its own tokenizer splits otherwise."""
    ids = job["prompt_ids"][PERPLEXITY_PROMPT]
    if job["engine"].startswith("onnxserve-"):
        return {"perplexity": served_perplexity(job, ids)}
    from onnxserve.server.quality.runs import perplexity

    model = LlamaCpp(job, logits_all=True) if job["engine"] == "llama.cpp" else OPENERS[job["engine"]](job)
    found = {"perplexity": perplexity(model.logits(ids), ids)}
    if isinstance(model, LlamaCpp):
        found["tokenized_otherwise"] = model.tokenized_otherwise(job)
    return found


def answer_commands(engine: Engine, job: dict, commands: Iterable[dict], answer: Callable[[dict], None]) -> list | None:
    """Answers each {"measure": <prompt>} with one repeat of that prompt, warmed up once before its
    first repeat, until {"finish": true}: then runs the concurrent streams and returns their
    figures. None when the commands end without a finish (the parent went away)."""
    warmed: set[str] = set()
    for command in commands:
        if command.get("finish"):
            levels = job["concurrency"] if engine.concurrent else [1]
            return [
                measure_streams(engine, job["streams"], job["stream_ids"], job["new_tokens"], level)
                for level in levels
                for _ in range(job["stream_repeats"])
            ]
        name = command.get("measure")
        if name not in job["prompts"]:
            raise ValueError(f"unknown command {command!r}: expected measure <{'|'.join(job['prompts'])}> or finish")
        prompt, ids = job["prompts"][name], job["prompt_ids"][name]
        if name not in warmed:
            engine.stream(prompt, ids, WARM_UP_TOKENS)
            warmed.add(name)
        answer(measure_repeat(engine, prompt, ids, job["new_tokens"]))
    return None


def _replies_channel() -> TextIO:
    """The worker's stdout, kept for the replies alone: file descriptor 1 then points at stderr, so
    that whatever else writes there (llama.cpp's C code, a library's print, a child process) cannot
    break the protocol."""
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return replies


def main() -> None:
    replies = _replies_channel()

    def answer(reply: dict) -> None:
        replies.write(json.dumps(reply) + "\n")
        replies.flush()

    job = json.loads(sys.stdin.readline())
    commands = (json.loads(line) for line in iter(sys.stdin.readline, ""))
    with opened(job) as engine:
        answer({"ready": job["engine"]})
        streams = answer_commands(engine, job, commands, answer)
    if streams is not None:
        peak_rss = peak_rss_bytes(job["engine"])  # before scoring, whose logits of every position take more
        answer({"streams": streams, "peak_rss_bytes": peak_rss, **scored(job)})


if __name__ == "__main__":
    main()
