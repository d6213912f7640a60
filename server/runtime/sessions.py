"""ONNX Runtime sessions: choosing the execution provider and running a graph on a batch."""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import build_and_package_info as build_info
from onnxruntime.datasets import get_example
from onnxserve.server.errors import ModelLoadError

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@cache
def cuda_device_count() -> int:
    """GPUs the CUDA driver can see. onnxruntime-gpu lists the CUDA provider as available on any
    machine, then silently runs on the CPU when there is no driver or device, so ask the driver."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def cuda_provider_options(device_id: int) -> dict[str, str]:
    """The CUDA provider's options. The arena grows by what is asked, not to the next power of
    two, so several models share a GPU without each holding up to twice what it uses; TF32 is
    off, so that fp32 variants compute in fp32 as their validation against PyTorch did (fp16 is the
    fast variant)."""
    return {"device_id": str(device_id), "arena_extend_strategy": "kSameAsRequested", "use_tf32": "0"}


@cache
def cuda_problem() -> str | None:
    """Why the CUDA provider cannot run here, or None when it can. onnxruntime-gpu lists the CUDA
    provider as available on any machine, then silently runs on the CPU when it cannot create it
    (no driver or device, or CUDA and cuDNN libraries of another major version than its build's),
    so a one-node session is created on it and asked which provider it got."""
    if CUDA not in ort.get_available_providers():
        return "this onnxruntime has no CUDA provider (install onnxruntime-gpu, not onnxruntime)"
    if cuda_device_count() == 0:
        return "the CUDA driver (libcuda.so.1) is missing or sees no GPU"
    try:
        # onnxruntime's own one-node example graph (a Mul): the server does not depend on onnx.
        probe = ort.InferenceSession(get_example("mul_1.onnx"), providers=[(CUDA, cuda_provider_options(0))])
    except Exception as error:  # onnxruntime raises its own untyped exceptions
        return f"the CUDA provider could not be created: {error}"
    if probe.get_providers()[0] != CUDA:
        return f"the CUDA provider could not be created; {_cuda_libraries()}"
    return None


def _cuda_libraries() -> str:
    """What the CUDA provider of this onnxruntime-gpu build needs, and which of it the dynamic
    loader cannot find."""
    major = build_info.cuda_version.split(".")[0]
    needed = [f"libcudart.so.{major}", f"libcublas.so.{major}", f"libcublasLt.so.{major}", "libcudnn.so.9"]
    missing = []
    for library in needed:
        try:
            ctypes.CDLL(library)
        except OSError:
            missing.append(library)
    found = f"not found: {', '.join(missing)}" if missing else "all found, so check the driver's CUDA version"
    return (
        f"{build_info.package_name} {ort.__version__} needs CUDA {major}.x and cuDNN 9 and a driver "
        f"for CUDA {major} ({found})"
    )


def resolve_device(device: str) -> str:
    """Maps --device auto|cpu|cuda to "cpu" or "cuda". `auto` takes the GPU when the CUDA provider
    can really be created, else the CPU, saying why; `cuda` without it stops with the reason."""
    if device not in ("auto", "cpu", "cuda"):
        raise ModelLoadError(f"unknown device {device!r}: use auto, cpu or cuda")
    if device == "cpu":
        return "cpu"
    problem = cuda_problem()
    if problem is None:
        return "cuda"
    if device == "cuda":
        raise ModelLoadError(f"--device cuda was asked for, but the CUDA provider cannot run here: {problem}")
    log.warning("--device auto: serving on the CPU, since the CUDA provider cannot run here: %s", problem)
    return "cpu"


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota. ONNX
    Runtime's own default counts the host's physical cores, which oversubscribes a container."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        return cpus
    return cpus if quota == "max" else max(1, min(cpus, int(quota) // int(period)))


@dataclass(frozen=True)
class SessionSettings:
    """How sessions are created. One session runs one batch at a time on `intra_op_threads`
    threads; parallel inter-op execution only fights the intra-op pool on small graphs."""

    device: str = "cpu"
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    gpu_device_id: int = 0


class Session:
    """One ONNX graph in an InferenceSession, fed only the inputs it declares."""

    def __init__(self, path: Path, settings: SessionSettings) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = settings.intra_op_threads or available_cpus()
        options.inter_op_num_threads = settings.inter_op_threads
        # Idle intra-op threads sleep instead of spinning: the server's own threads (gRPC,
        # tokenizing, batching) share these cores, and spinning took their CPU (measured: 30% more
        # CPU per request, and worse throughput, with it on).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers: list = [CPU]
        if settings.device == "cuda":
            providers = [(CUDA, cuda_provider_options(settings.gpu_device_id)), CPU]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as error:  # onnxruntime raises its own untyped exceptions
            raise ModelLoadError(f"cannot load {path.name}: {error}") from error
        self.provider = self.session.get_providers()[0]
        self.device_id = settings.gpu_device_id if self.provider == CUDA else 0
        if settings.device == "cuda" and self.provider != CUDA:
            raise ModelLoadError(f"{path.name}: CUDA was asked for but the session runs on {self.provider}")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # Outputs whose second axis is symbolic follow the input's tokens (per-token outputs);
        # the others have one row per sequence.
        self.per_token_outputs = {
            o.name for o in self.session.get_outputs() if len(o.shape) >= 2 and isinstance(o.shape[1], str)
        }

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, {n: feeds[n] for n in self.input_names})
        return dict(zip(self.output_names, outputs, strict=True))
