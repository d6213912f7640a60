"""Prometheus metrics, served on their own HTTP port. Each server has its own CollectorRegistry,
so that several servers in one process (the tests) never share or clash over series."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from onnxserve.enums import short_name
from onnxserve.v1 import common_pb2, models_pb2

log = logging.getLogger(__name__)

# Seconds: from well under a millisecond (Tokenize) to a long batch on a large model.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BATCH_TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536, 262144)
NO_MODEL = ""  # the model label of calls that name no model the server holds


class _ModelCollector(Collector):
    """Model states and queue depths, read from the registry when scraped."""

    def __init__(self, models: Callable[[], Iterable]) -> None:
        self.models = models

    def collect(self) -> Iterator[Metric]:
        states = GaugeMetricFamily(
            "onnxserve_model_state", "1 for the state of each model version", labels=["model", "version", "state"]
        )
        loaded = GaugeMetricFamily("onnxserve_models_loaded", "Model versions ready to serve")
        depth = GaugeMetricFamily(
            "onnxserve_queue_depth", "Requests waiting in a model's batch queue", labels=["model", "version"]
        )
        refused = GaugeMetricFamily(
            "onnxserve_variant_refused",
            "1 for each variant refused at load because its probes missed the export's gate on this machine",
            labels=["model", "version", "precision"],
        )
        ready = 0
        for model in self.models():
            for variant in model.refused_variants:
                precision = short_name(common_pb2.Precision, variant.precision)
                refused.add_metric([model.name, str(model.version), precision], 1)
            state = short_name(models_pb2.ModelState, model.state)
            states.add_metric([model.name, str(model.version), state], 1)
            ready += model.state == models_pb2.MODEL_STATE_READY
            waiting = model.pipeline.queue_depth() if model.pipeline is not None else None
            if waiting is not None:
                depth.add_metric([model.name, str(model.version)], waiting)
        loaded.add_metric([], ready)
        yield from (states, loaded, depth, refused)


class Metrics:
    """The server's series, and the HTTP endpoint that exposes them."""

    def __init__(self, models: Callable[[], Iterable]) -> None:
        self.registry = CollectorRegistry()
        labels = ["model", "rpc", "code"]
        self.requests = Counter("onnxserve_requests", "Calls answered", labels, registry=self.registry)
        self.errors = Counter("onnxserve_request_errors", "Calls answered with a non-OK status", labels,
                              registry=self.registry)
        self.latency = self._histogram(
            "onnxserve_request_duration_seconds", "End-to-end call latency", labels=("model", "rpc")
        )
        self.queue_time = self._histogram("onnxserve_queue_duration_seconds", "Time a request waited for its batch")
        self.inference_time = self._histogram("onnxserve_inference_duration_seconds", "Time a request spent in runs")
        self.batch_size = self._histogram("onnxserve_batch_size", "Sequences per run", buckets=BATCH_SIZE_BUCKETS)
        self.batch_tokens = self._histogram(
            "onnxserve_batch_tokens", "Padded tokens per run (rows x longest row)", buckets=BATCH_TOKEN_BUCKETS
        )
        self.registry.register(_ModelCollector(models))
        self._http: WSGIServer | None = None

    def _histogram(
        self, name: str, documentation: str, labels: Iterable[str] = ("model",),
        buckets: Iterable[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        return Histogram(name, documentation, list(labels), buckets=tuple(buckets), registry=self.registry)

    def observe_call(
        self, model: str, rpc: str, code: str, seconds: float, metadata: common_pb2.Metadata | None
    ) -> None:
        """One answered call; `metadata` is the response's, when it carries one."""
        self.requests.labels(model, rpc, code).inc()
        if code != "OK":
            self.errors.labels(model, rpc, code).inc()
        self.latency.labels(model, rpc).observe(seconds)
        if metadata is not None and metadata.inference_ns:
            self.queue_time.labels(model).observe(metadata.queue_ns / 1e9)
            self.inference_time.labels(model).observe(metadata.inference_ns / 1e9)

    def observe_batch(self, model: str, rows: int, tokens: int) -> None:
        """One ONNX Runtime run; the batcher calls this through its run hook."""
        self.batch_size.labels(model).observe(rows)
        self.batch_tokens.labels(model).observe(tokens)

    def serve(self, host: str, port: int) -> int:
        """Starts the HTTP endpoint (/metrics) in a daemon thread; returns the port bound."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        bound = self._http.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
