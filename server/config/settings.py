"""Server settings: what `onnxserve serve` takes. These dataclasses are the one definition of
every setting: loader.py derives the TOML keys, ONNXSERVE_* variables and CLI flags
from their fields, so a field added here is configurable everywhere."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ModelSettings:
    """How each model is served."""

    precision: str = "auto"  # auto, fp32, fp16, int8 or int4 (decoders)
    device: str = ""  # "" follows the server's device; auto, cpu or cuda for this model alone
    # Dynamic batching: one run merges requests, up to max_batch_size sequences and
    # max_batch_tokens padded tokens (rows x longest row); a request over either is split.
    max_batch_size: int = 32
    max_batch_tokens: int = 16384
    # How long an idle model holds a run that could still grow; 0 runs at once (runs still merge
    # whatever arrives while the previous run is busy).
    max_queue_delay_ms: float = 0.0
    max_queue_size: int = 1024  # requests waiting per model; one more is refused (RESOURCE_EXHAUSTED)
    # Inputs (texts, questions, prompts) one request may hold, as TEI's max_client_batch_size and
    # OpenAI's 2048 embedding inputs: a request with more is refused (INVALID_ARGUMENT) before any work.
    max_inputs_per_request: int = 2048
    intra_op_threads: int = 0  # 0: one per CPU this process may use (affinity and cgroup quota)
    inter_op_threads: int = 1  # graphs run sequentially: parallel operators only fight the intra-op pool
    warmup: bool = True  # run the model once at load, before it takes traffic
    # Continuous batching of fused decoders: concurrent generations share decode steps, at most this
    # many rows (prompts) at once; the next wait for a free row (max_queue_size of them). 0: off.
    max_generation_rows: int = 16
    # A variant whose probes miss the export's gate on this machine (int8 kernels differ by CPU) is
    # refused and the next precision served; true serves it anyway, with a warning in the log.
    serve_refused_variants: bool = False
    # Speech models: audio longer than this (seconds, read from an encoded file's header before it
    # is decoded) is refused with INVALID_ARGUMENT.
    max_audio_seconds: float = 600.0


@dataclass(frozen=True)
class ServerSettings:
    repository: Path
    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "auto"  # auto, cpu or cuda
    models: ModelSettings = ModelSettings()
    # Per-model settings by model name, complete (the defaults above refined by the model's table).
    model_overrides: Mapping[str, ModelSettings] = field(default_factory=dict)
    shutdown_grace_s: float = 10.0  # how long in-flight calls may take to finish on SIGTERM
    drain_delay_s: float = 0.0  # NOT_SERVING but still answering, so load balancers move away first
    max_connection_age_s: float = 0.0  # gRPC A9; 0: connections live forever
    max_connection_age_grace_s: float = 0.0  # 0: gRPC's default (no limit)
    max_receive_message_bytes: int = 4 * 1024 * 1024
    max_send_message_bytes: int = 64 * 1024 * 1024
    # Calls the server works on at once, all models together; one more is refused at once
    # (RESOURCE_EXHAUSTED) before any work is spent on it. 0: no limit.
    max_concurrent_calls: int = 0
    poll_interval_s: float = 5.0  # how often the repository is checked for changes; 0: never
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None  # the Prometheus endpoint; None: no endpoint, 0: any free port
    log_level: str = "info"
    log_format: str = "text"  # text or json
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key, the server speaks TLS
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # PEM CA bundle; set, every client must present a certificate
    auth_tokens: tuple[str, ...] = ()  # accepted bearer tokens; empty: no authentication
    # Readiness (health of the inference services): SERVING only while each of these models is
    # READY; empty: every model the repository holds.
    required_models: tuple[str, ...] = ()

    def model_settings(self, name: str) -> ModelSettings:
        return self.model_overrides.get(name, self.models)
