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

# The graph's first output, and the CPU features NumPy's CPUID saw inside the emulator.
_SCRIPT = """
import sys
import numpy as np, onnxruntime as ort
from numpy._core._multiarray_umath import __cpu_features__ as cpu
graph, inputs, output = sys.argv[1:]
feeds = dict(np.load(inputs))
first = ort.InferenceSession(graph, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
np.savez(output, first=first, avx2=cpu["AVX2"], avx512f=cpu["AVX512F"], vnni=cpu["AVX512VNNI"])
"""


def run_on_haswell(graph: Path, feeds: dict[str, np.ndarray], work: Path) -> np.ndarray:
    """The graph's first output for `feeds`, computed on an emulated Haswell (checked: AVX2 without
    AVX-512 or VNNI)."""
    np.savez(work / "inputs.npz", **feeds)
    (work / "run_graph.py").write_text(_SCRIPT)
    command = [QEMU, "-cpu", "Haswell", sys.executable, str(work / "run_graph.py"), str(graph)]
    subprocess.run([*command, str(work / "inputs.npz"), str(work / "output.npz")], check=True, timeout=900)
    output = np.load(work / "output.npz")
    assert output["avx2"] and not output["avx512f"] and not output["vnni"], "the emulated CPU is not AVX2-only"
    return output["first"]
