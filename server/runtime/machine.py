"""The properties of this machine that decide which ONNX Runtime kernels run: recorded by the
exporter beside its validation figures, and reported by the server beside its load-time ones."""

from __future__ import annotations

import ctypes
import platform
from functools import cache
from pathlib import Path

import onnxruntime as ort
from onnxruntime.capi import build_and_package_info as build_info
from onnxserve.server.runtime.sessions import CUDA, cuda_device_count

from onnxserve.v1 import manifest_pb2

# The flags (as /proc/cpuinfo names them) that pick MLAS's int8, fp16 and fp32 kernels, and
# NumPy's names for those it detects itself with CPUID.
KERNEL_FEATURES = (
    "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
    "amx_tile", "amx_int8", "amx_bf16",
)  # fmt: skip
_NUMPY_NAMES = {
    "avx2": "AVX2", "fma": "FMA3", "f16c": "F16C", "avx512f": "AVX512F", "avx512bw": "AVX512BW",
    "avx512_vnni": "AVX512VNNI", "avx512_bf16": "AVX512BF16",
}  # fmt: skip


def this_machine(execution_provider: str, gpu_device_id: int = 0) -> manifest_pb2.MachineInfo:
    """This machine as seen by a session on `execution_provider`."""
    model, flags = _cpu()
    return manifest_pb2.MachineInfo(
        cpu_model=model,
        cpu_features=[feature for feature in KERNEL_FEATURES if feature in _features(flags)],
        onnxruntime_version=f"{build_info.package_name} {ort.__version__}",
        execution_provider=execution_provider,
        gpu_name=_gpu_name(gpu_device_id) if execution_provider == CUDA else "",
    )


def describe(machine: manifest_pb2.MachineInfo) -> str:
    """One line for logs and messages, e.g. "AMD EPYC 7B13 (avx2, fma, f16c), onnxruntime-gpu 1.31.1"."""
    where = machine.gpu_name or f"{machine.cpu_model or 'unknown CPU'} ({', '.join(machine.cpu_features) or 'none'})"
    return f"{where}, {machine.onnxruntime_version}, {machine.execution_provider}"


def _features(cpuinfo_flags: frozenset[str]) -> frozenset[str]:
    """The kernel features this process's CPUID reports. NumPy asks CPUID for most of them;
    /proc/cpuinfo adds AVX-VNNI and AMX, but only where it agrees with CPUID on the rest: an
    emulator (qemu -cpu Haswell) or a VM's masked CPUID shows the host's flags there."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as cpuid
    except ImportError:  # NumPy 1.x
        from numpy.core._multiarray_umath import __cpu_features__ as cpuid
    detected = {feature for feature, name in _NUMPY_NAMES.items() if cpuid.get(name)}
    if detected == {feature for feature in _NUMPY_NAMES if feature in cpuinfo_flags}:
        detected |= cpuinfo_flags & set(KERNEL_FEATURES)
    return frozenset(detected)


@cache
def _cpu() -> tuple[str, frozenset[str]]:
    """The CPU's model name and flags, from /proc/cpuinfo (Linux, where the server runs)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor(), frozenset()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    return fields.get("model name", platform.processor()), frozenset(fields.get("flags", "").split())


@cache
def _gpu_name(device_id: int) -> str:
    """The CUDA driver's name for the device (cuDeviceGetName)."""
    if cuda_device_count() <= device_id:
        return ""
    driver = ctypes.CDLL("libcuda.so.1")
    device, name = ctypes.c_int(0), ctypes.create_string_buffer(256)
    if driver.cuDeviceGet(ctypes.byref(device), device_id) != 0:
        return ""
    if driver.cuDeviceGetName(name, len(name), device) != 0:
        return ""
    return name.value.decode(errors="replace")
