"""The three engines the benchmark compares, each measured closed-loop at a concurrency C:

(a) raw: the server's own ONNX Runtime `Session` (same threads, same graph options) in this
    process, on pre-tokenized padded batches: each round takes the next C requests in arrival
    order, in runs of at most max_batch_size padded to their longest. The engine's limit: no
    tokenizing, no gRPC, no queue, and no batching by length.
(b) server: `onnxserve serve` in its own process, called over gRPC on loopback by bench.loadgen
    in another one.
(c) pipeline: the transformers pipeline (PyTorch) in this process, each round's texts in one call
    with batch_size.

In (a) and (c) every request of a round waits for the whole round, as the callers of a perfectly
batching server would."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnxserve.server.models.loading import choose_variant
from onnxserve.server.runtime.sessions import Session, SessionSettings, available_cpus
from onnxserve.server.runtime.tokenizer import TextTokenizer, batch_arrays

from bench.minilm import Model
from onnxserve.repository import TOKENIZER_FILE, read_manifest

Batch = list[int]  # indices into the workload's texts


@dataclass(frozen=True)
class Load:
    """Callers in flight, and how long to measure: until `seconds` have passed and at least
    `min_requests` were answered."""

    concurrency: int
    seconds: float
    min_requests: int


@dataclass(frozen=True)
class Sample:
    latencies: list[float]  # seconds, one per request
    seconds: float  # wall time of the measurement
    batch_sizes: list[int]  # the run that carried each request


def schedule(count: int, concurrency: int, max_batch_size: int) -> list[list[Batch]]:
    """One cycle of rounds over `count` texts: round r holds requests r*C .. r*C + C - 1 (wrapping),
    cut into batches of max_batch_size; the cycle repeats after count / gcd(count, C) rounds."""
    return [
        [
            [(r * concurrency + k) % count for k in range(start, min(concurrency, start + max_batch_size))]
            for start in range(0, concurrency, max_batch_size)
        ]
        for r in range(count // math.gcd(count, concurrency))
    ]


def rounds(run: Callable[[Batch], object], cycle: list[list[Batch]], load: Load) -> Sample:
    """One warm-up round, then rounds until the load is met; a request's latency is its round's."""
    for batch in cycle[0]:
        run(batch)
    latencies: list[float] = []
    batch_sizes: list[int] = []
    started = time.perf_counter()
    turn = 0
    while time.perf_counter() - started < load.seconds or len(latencies) < load.min_requests:
        sent = time.perf_counter()
        for batch in cycle[turn % len(cycle)]:
            run(batch)
        latencies += [time.perf_counter() - sent] * load.concurrency
        batch_sizes += [len(batch) for batch in cycle[turn % len(cycle)] for _ in batch]
        turn += 1
    return Sample(latencies, time.perf_counter() - started, batch_sizes)


class InProcess(Protocol):
    """An engine measured in this process: the raw session or the pipeline."""

    def measure(self, texts: list[str], load: Load, max_batch_size: int) -> Sample: ...


class RawSession:
    """(a): the variant the server would load, run bare."""

    def __init__(self, model: Model, precision: str, device: str) -> None:
        manifest = read_manifest(model.version_dir)
        variant = choose_variant(manifest, precision, device)
        path = model.version_dir / next(f.path for f in variant.files if f.role == "model")
        self.session = Session(path, SessionSettings(device=device))
        self.tokenizer = TextTokenizer(model.version_dir / TOKENIZER_FILE, manifest)
        self.provider = self.session.provider

    def measure(self, texts: list[str], load: Load, max_batch_size: int) -> Sample:
        encodings = self.tokenizer.encode(texts)
        cycle = schedule(len(texts), load.concurrency, max_batch_size)
        feeds = {
            tuple(batch): batch_arrays([encodings[i] for i in batch], self.tokenizer.pad_token_id)
            for batches in cycle
            for batch in batches
        }
        return rounds(lambda batch: self.session.run(feeds[tuple(batch)]), cycle, load)


class TransformersPipeline:
    """(c): `transformers.pipeline` on the checkpoint the model was exported from."""

    def __init__(self, model: Model, task: str, device: str, precision: str) -> None:
        import torch
        from transformers import pipeline

        torch.set_num_threads(available_cpus())
        self.pipeline = pipeline(
            task,
            model=str(model.checkpoint),
            device=0 if device == "cuda" else -1,
            dtype=torch.float16 if precision == "fp16" else torch.float32,
        )
        # Tensors out, not nested lists: the cheapest form each pipeline offers.
        self.options = {"return_tensors": True} if task == "feature-extraction" else {"top_k": None}

    def measure(self, texts: list[str], load: Load, max_batch_size: int) -> Sample:
        def run(batch: Batch) -> object:
            return self.pipeline([texts[i] for i in batch], batch_size=len(batch), truncation=True, **self.options)

        return rounds(run, schedule(len(texts), load.concurrency, max_batch_size), load)


class Server:
    """(b): a running server and the caller process that loads it."""

    def __init__(self, target: str, caller: subprocess.Popen) -> None:
        self.target = target
        self.caller = caller

    def measure(self, rpc: str, model: str, texts: list[str], load: Load, field: str = "texts") -> Sample:
        """`texts` fill the requests' `field`, one each: texts, or base64 files for "images"."""
        job = {
            "target": self.target,
            "rpc": rpc,
            "model": model,
            field: texts,
            "concurrency": load.concurrency,
            "seconds": load.seconds,
            "min_requests": load.min_requests,
        }
        self.caller.stdin.write(json.dumps(job) + "\n")
        self.caller.stdin.flush()
        line = self.caller.stdout.readline()
        if not line:
            raise RuntimeError("the load generator died; see its error output above")
        result = json.loads(line)
        return Sample(result["latencies"], result["seconds"], result["batch_sizes"])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_serving(target: str, models: list[str], process: subprocess.Popen, log: Path) -> None:
    """Until the health service says every model is SERVING (each model has its own entry)."""
    deadline = time.monotonic() + 600
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for model in models:
            while True:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not come up; its log is {log}")
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(service=model), timeout=5).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.2)


@contextmanager
def server_process(repository: Path, models: list[str], flags: list[str], log: Path) -> Iterator[str]:
    """`onnxserve serve` over the repository (its log in `log`), as a child of this process; yields
    its target once every model is SERVING, and has waited for it to exit on leaving."""
    target = f"127.0.0.1:{_free_port()}"
    port = target.rsplit(":", 1)[1]
    command = [sys.executable, "-m", "onnxserve", "serve", "--repository", str(repository), "--port", port, *flags]
    with log.open("w") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        try:
            _wait_serving(target, models, server, log)
            yield target
        finally:
            server.terminate()
            server.wait(timeout=30)


@contextmanager
def served(repository: Path, models: list[str], flags: list[str], log: Path) -> Iterator[Server]:
    """`onnxserve serve` over the repository (its log in `log`), and a bench.loadgen process."""
    with server_process(repository, models, flags, log) as target:
        caller = subprocess.Popen(
            [sys.executable, "-m", "bench.loadgen"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            yield Server(target, caller)
        finally:
            caller.stdin.close()
            caller.terminate()
            caller.wait(timeout=30)
