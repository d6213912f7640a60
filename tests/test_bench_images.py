"""`make bench`'s image workload, its bookkeeping only (the measurements are too slow for tests):
the workload's files, the load generator's image requests, and the ratios the report prints."""

from __future__ import annotations

import base64
import io

from PIL import Image

import bench.images as images
from bench.__main__ import Cell, measurement
from bench.engines import Sample
from bench.loadgen import _inputs


def test_the_workload_is_jpeg_files_of_the_listed_sizes():
    files = images.workload(8)
    opened = [Image.open(io.BytesIO(data)) for data in files]
    assert {image.format for image in opened} == {"JPEG"}
    assert [image.size for image in opened] == [images.SIZES[i % len(images.SIZES)] for i in range(8)]
    assert files == images.workload(8)  # seeded: every engine and every run sees the same images


def test_the_load_generator_sends_one_image_per_request():
    files = images.workload(2)
    job = {"images": [base64.b64encode(data).decode() for data in files]}
    assert [one["images"][0].data for one in _inputs(job)] == files
    assert _inputs({"texts": ["a", "b"]}) == [{"texts": ["a"]}, {"texts": ["b"]}]


def test_ratios_are_the_servers_over_the_raw_sessions_and_the_pipelines():
    def made(engine: str, precision: str, concurrency: int, per_second: float):
        sample = Sample(latencies=[0.01] * int(per_second), seconds=1.0, batch_sizes=[1] * int(per_second))
        return measurement(engine, precision, Cell(images.TASK, images.WORKLOAD, concurrency), sample)

    results = [
        made("raw", "fp32", 1, 40), made("server", "fp32", 1, 30), made("pipeline", "fp32", 1, 10),
        made("raw", "int8", 1, 80), made("server", "int8", 1, 60),
    ]  # fmt: skip
    assert images.ratios(results) == [
        {"precision": "fp32", "concurrency": 1, "vs_raw": 0.75, "vs_pipeline": 3.0},
        {"precision": "int8", "concurrency": 1, "vs_raw": 0.75, "vs_pipeline": 6.0},
    ]
