"""The benchmark's gRPC caller, in a process of its own as real callers are (`python -m
bench.loadgen`): reads one JSON job per line on stdin, runs it closed-loop (`concurrency` callers,
each sending its next one-text request as soon as its last is answered) and writes one JSON
result per line on stdout: each request's latency and the batch size the server reported. A job
carries `texts`, or `images` (base64 encoded files) for image RPCs, one per request."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import sys
import time
from typing import Any

import grpc

from onnxserve.v1 import inference_pb2, inference_pb2_grpc

REQUESTS = {
    "Encode": inference_pb2.EncodeRequest,
    "Classify": inference_pb2.ClassifyRequest,
    "ClassifyImage": inference_pb2.ClassifyImageRequest,
}


async def closed_loop(call: Any, requests: list[Any], concurrency: int, seconds: float, min_requests: int) -> dict:
    """Runs callers until `seconds` have passed and `min_requests` were answered."""
    latencies: list[float] = []
    batch_sizes: list[int] = []
    turn = itertools.count()
    started = time.perf_counter()

    async def caller() -> None:
        while time.perf_counter() - started < seconds or len(latencies) < min_requests:
            request = requests[next(turn) % len(requests)]
            sent = time.perf_counter()
            response = await call(request, timeout=600)
            latencies.append(time.perf_counter() - sent)
            batch_sizes.append(response.metadata.batch_size)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return {"latencies": latencies, "batch_sizes": batch_sizes, "seconds": time.perf_counter() - started}


async def run(job: dict) -> dict:
    """A warm-up of two requests per caller, not recorded, then the measured loop."""
    async with grpc.aio.insecure_channel(job["target"]) as channel:
        call = getattr(inference_pb2_grpc.InferenceStub(channel), job["rpc"])
        requests = [REQUESTS[job["rpc"]](model=job["model"], **one) for one in _inputs(job)]
        concurrency = job["concurrency"]
        await closed_loop(call, requests, concurrency, 0.0, 2 * concurrency)
        return await closed_loop(call, requests, concurrency, job["seconds"], job["min_requests"])


def _inputs(job: dict) -> list[dict]:
    """Each request's input field: one text, or one encoded image."""
    if "images" in job:
        return [{"images": [inference_pb2.Image(data=base64.b64decode(data))]} for data in job["images"]]
    return [{"texts": [text]} for text in job["texts"]]


def main() -> None:
    for line in sys.stdin:
        print(json.dumps(asyncio.run(run(json.loads(line)))), flush=True)


if __name__ == "__main__":
    main()
