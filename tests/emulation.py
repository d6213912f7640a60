"""Running an ONNX graph on an emulated AVX2-only CPU (qemu-user's Haswell: no AVX-512, no VNNI),
where ONNX Runtime takes the int8 kernels whose uint8 x int8 pair sums saturate in int16, whatever
CPU runs the tests."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

QEMU = shutil.which("qemu-x86_64")
needs_qemu = pytest.mark.skipif(
    QEMU is None or platform.machine() != "x86_64", reason="needs Debian's qemu-user (qemu-x86_64)"
)

# What every script run there ends with: its `results` (arrays by name), with the CPU features
# NumPy's CPUID saw inside the emulator, into the .npz named by its last argument.
_SAVE = """
from numpy._core._multiarray_umath import __cpu_features__ as cpu
np.savez(sys.argv[-1], avx2=cpu["AVX2"], avx512f=cpu["AVX512F"], vnni=cpu["AVX512VNNI"], **results)
"""

# The graph's first output.
_RUN_GRAPH = """
import sys
import numpy as np, onnxruntime as ort
graph, inputs = sys.argv[1:3]
feeds = dict(np.load(inputs))
results = {"first": ort.InferenceSession(graph, providers=["CPUExecutionProvider"]).run(None, feeds)[0]}
"""


def run_script_on_haswell(script: str, arguments: list[str], work: Path) -> dict[str, np.ndarray]:
    """Runs the Python `script` with `arguments` on an emulated Haswell (checked: AVX2 without
    AVX-512 or VNNI); the script leaves its `results` in a dict of arrays, returned here."""
    (work / "script.py").write_text(script + _SAVE)
    command = [QEMU, "-cpu", "Haswell", sys.executable, str(work / "script.py"), *arguments]
    subprocess.run([*command, str(work / "results.npz")], check=True, timeout=900)
    with np.load(work / "results.npz") as output:
        results = dict(output)
    features = {name: bool(results.pop(name)) for name in ("avx2", "avx512f", "vnni")}
    assert features == {"avx2": True, "avx512f": False, "vnni": False}, f"the emulated CPU is not AVX2-only: {features}"
    return results


def run_on_haswell(graph: Path, feeds: dict[str, np.ndarray], work: Path) -> np.ndarray:
    """The graph's first output for `feeds`, computed on an emulated Haswell."""
    np.savez(work / "inputs.npz", **feeds)
    return run_script_on_haswell(_RUN_GRAPH, [str(graph), str(work / "inputs.npz")], work)["first"]
