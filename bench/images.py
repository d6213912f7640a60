"""`make bench`'s image workload: ClassifyImage throughput, one image per request.

    python -m bench.images [--seconds 2] [--repeats 1] [--concurrency 1 8] [--precisions fp32 int8]
                           [--images 64] [--work ~/.cache/onnxserve-bench]

The model is a ViT-Small shape (224 x 224, patches of 16, 12 layers of 384, 6 heads; 10 labels)
with random, seeded weights: no pretrained vision checkpoint can be downloaded here (no model hub,
and a search of the registry's package lists found none in transformers' format), and speed does
not depend on the weights' values. Its image processor is ViTImageProcessor's default (resize to 224 x 224, bilinear;
rescale; normalize). The images are JPEG files of varied sizes (photographs' 4:3 and 3:2, a
portrait, a large one), the same for every engine:

(a) raw: the server's ONNX Runtime `Session` on the variant the server loads, in this process, on
    pixel_values computed beforehand (no decoding, no resizing, no gRPC), in batches of
    min(c, max batch size) as bench/engines.py runs text;
(b) server: `onnxserve serve` in its own process, ClassifyImage over gRPC on loopback from the
    bench.loadgen process, each request one encoded file (decoded, processed and batched by the
    server);
(c) pipeline: transformers' image-classification pipeline (PyTorch, fp32) in this process on the
    same files opened with Pillow, each round's images in one call.

Prints images/s with p50/p99 latencies and the server's ratio to each; writes them with the
machine's description to bench/results/images-<time>.json."""

from __future__ import annotations

import argparse
import base64
import io
import os
import shlex
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
from onnxserve.server.models.loading import choose_variant
from onnxserve.server.runtime.sessions import Session, SessionSettings, available_cpus
from onnxserve.server.tasks.images import ImageProcessor, decode
from PIL import Image
from rich.console import Console
from rich.table import Table

from bench.__main__ import Cell, Measurement, best_of, machine, measurement, write_report
from bench.engines import Batch, Load, Sample, rounds, schedule, served
from bench.minilm import Model, _exported, _exporter_fingerprint, held_precisions
from onnxserve.repository import read_manifest
from onnxserve.v1 import inference_pb2

MODEL = "vit-small-random"
TASK, WORKLOAD = "classify-image", "jpeg"
#: (width, height) of the workload's images, cycled: 4:3 and 3:2 photographs, a portrait, a large one.
SIZES = ((640, 480), (500, 375), (375, 500), (800, 533), (1024, 768), (320, 240))


def checkpoint(work: Path) -> Path:
    """The random ViT-Small classifier and its processor, saved once under the work folder."""
    folder = work / "checkpoints" / MODEL
    if not (folder / "config.json").is_file():
        import torch
        from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

        torch.manual_seed(0)
        labels = {i: f"label {i}" for i in range(10)}
        config = ViTConfig(
            image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
            intermediate_size=1536, id2label=labels, label2id={v: k for k, v in labels.items()},
        )  # fmt: skip
        ViTForImageClassification(config).eval().save_pretrained(folder)
        ViTImageProcessor().save_pretrained(folder)
    return folder


def workload(count: int) -> list[bytes]:
    """`count` JPEG files: a colour ramp under seeded noise, at the SIZES in turn."""
    rng = np.random.default_rng(0)
    files = []
    for index in range(count):
        width, height = SIZES[index % len(SIZES)]
        ramp = np.linspace(0, 255, width * height * 3).reshape(height, width, 3)
        pixels = np.clip(ramp + rng.normal(0, 40, ramp.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        files.append(buffer.getvalue())
    return files


class RawImages:
    """(a): the variant the server would load, run bare on pixel_values made beforehand."""

    def __init__(self, model: Model, precision: str, files: list[bytes]) -> None:
        manifest = read_manifest(model.version_dir)
        variant = choose_variant(manifest, precision, "cpu")
        path = model.version_dir / next(f.path for f in variant.files if f.role == "model")
        self.session = Session(path, SessionSettings(device="cpu"))
        processor = ImageProcessor(manifest.image_processing)
        self.pixels = [processor(decode(inference_pb2.Image(data=data), 0)) for data in files]

    def measure(self, load: Load, max_batch_size: int) -> Sample:
        def run(batch: Batch) -> object:
            return self.session.run({"pixel_values": np.stack([self.pixels[i] for i in batch])})

        return rounds(run, schedule(len(self.pixels), load.concurrency, max_batch_size), load)


class PipelineImages:
    """(c): transformers' image-classification pipeline on the checkpoint, fp32 on the CPU."""

    def __init__(self, model: Model, files: list[bytes]) -> None:
        import torch
        from transformers import pipeline

        torch.set_num_threads(available_cpus())
        self.pipeline = pipeline("image-classification", model=str(model.checkpoint), device=-1)
        self.files = files

    def measure(self, load: Load, max_batch_size: int) -> Sample:
        def run(batch: Batch) -> object:
            images = [Image.open(io.BytesIO(self.files[i])) for i in batch]  # decoded inside, as the server does
            return self.pipeline(images, batch_size=len(batch))

        return rounds(run, schedule(len(self.files), load.concurrency, max_batch_size), load)


def run(args: argparse.Namespace, results: list[Measurement]) -> None:
    """Every concurrency on the three engines, in turns, appended to `results` as measured."""
    repository = args.work / f"repository-{_exporter_fingerprint()}"
    source = checkpoint(args.work)
    model = Model(MODEL, source, _exported(source, repository, MODEL, args.precisions))
    held = held_precisions(model.version_dir)
    args.skipped = {p: "not exported (the exporter left it out: it missed its gate)" for p in args.precisions
                    if p not in held}  # fmt: skip
    files = workload(args.images)
    sent = [base64.b64encode(data).decode() for data in files]
    pipeline = PipelineImages(model, files)
    for precision in [p for p in args.precisions if p in held]:
        raw = RawImages(model, precision, files)
        flags = ["--device", "cpu", "--precision", precision, "--max-batch-size", str(args.max_batch_size)]
        with served(repository, [MODEL], flags, args.work / f"server-images-{precision}.log") as server:
            for concurrency in args.concurrency:
                cell = Cell(TASK, WORKLOAD, concurrency)
                load = Load(concurrency, args.seconds, 2 * concurrency)
                engines = {
                    "raw": partial(raw.measure, load, args.max_batch_size),
                    "server": partial(server.measure, "ClassifyImage", MODEL, sent, load, "images"),
                }
                if precision == "fp32":
                    engines["pipeline"] = partial(pipeline.measure, load, args.max_batch_size)
                for engine, sample in best_of(engines, args.repeats).items():
                    results.append(measurement(engine, precision, cell, sample))
                    found = results[-1]
                    print(f"  {engine:8} {precision} c={concurrency:<3} {found.throughput:8.1f} images/s "
                          f"p50 {found.p50_ms:8.2f} ms p99 {found.p99_ms:8.2f} ms", flush=True)  # fmt: skip


def ratios(results: list[Measurement]) -> list[dict]:
    """The server's images/s over the raw session's (same precision) and the pipeline's (fp32)."""
    by_key = {(m.engine, m.precision, m.concurrency): m for m in results}
    found = []
    for m in results:
        if m.engine != "server":
            continue
        raw, pipeline = by_key.get(("raw", m.precision, m.concurrency)), by_key.get(("pipeline", "fp32", m.concurrency))
        found.append({
            "precision": m.precision,
            "concurrency": m.concurrency,
            "vs_raw": round(m.throughput / raw.throughput, 2) if raw else None,
            "vs_pipeline": round(m.throughput / pipeline.throughput, 2) if pipeline else None,
        })  # fmt: skip
    return found


def print_table(results: list[Measurement], found: list[dict]) -> None:
    table = Table(title="ClassifyImage, one JPEG per request: images/s · p50/p99 ms")
    for column in ("engine", "precision", "c", "images/s", "p50 ms", "p99 ms", "server / it"):
        table.add_column(column, justify="right")
    versus = {(r["precision"], r["concurrency"]): r for r in found}
    for m in results:
        ratio = versus.get((m.precision, m.concurrency), {}).get(f"vs_{m.engine}")
        cells = (m.engine, m.precision, str(m.concurrency), f"{m.throughput:.1f}", f"{m.p50_ms:.1f}", f"{m.p99_ms:.1f}")
        table.add_row(*cells, f"{ratio:.2f}x" if ratio else "")
    Console(width=160).print(table)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.images", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per cell and engine (default 2)")
    parser.add_argument("--repeats", type=int, default=1, help="measurements per cell and engine, the best kept")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "int8"), default=["fp32", "int8"])
    parser.add_argument("--images", type=int, default=64, help="JPEG files in the workload (default 64)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="the server's, and the raw batches'")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "onnxserve-bench")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    load_before, started = os.getloadavg(), time.time()
    results: list[Measurement] = []
    failure = None
    try:
        run(args, results)
    except Exception as error:  # the report keeps what did run, then the failure is raised
        failure = error
    found = ratios(results)
    report = {
        "command": shlex.join(["python", "-m", "bench.images", *(sys.argv[1:] if argv is None else argv)]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_seconds": round(time.time() - started, 1),
        "machine": {
            **machine("cpu", "CPUExecutionProvider"),
            "load_before": load_before,
            "load_after": os.getloadavg(),
        },
        "model": MODEL,
        "settings": {
            "seconds": args.seconds,
            "repeats": args.repeats,
            "images": args.images,
            "sizes": SIZES,
            "max_batch_size": args.max_batch_size,
        },
        "skipped": getattr(args, "skipped", {}),
        "failure": None if failure is None else f"{type(failure).__name__}: {failure}",
        "measurements": [asdict(m) for m in results],
        "ratios": found,
    }
    path = write_report("images", report)
    print_table(results, found)
    print(f"load average before/after: {load_before} / {report['machine']['load_after']}")
    print(f"written to {path}")
    if failure is not None:
        raise failure


if __name__ == "__main__":
    main()
