"""A stream's tokens must not depend on who else is decoding, at every precision, on every CPU
(issue 17, item 5).

ONNX Runtime 1.31's MatMulNBits computes a row alone (M=1) on a path of its own on some CPUs and
settings (AVX2's int4 at accuracy_level 4) and one path for any M >= 2, so a stream that decodes a
step alone would get other logits than beside batchmates. The fused decoder gives a one-row run a
spare row where its load-time probe finds that (`fused.solo_runs_differ`). A stream's logits, bit
for bit, alone and beside batchmates that join (one with a one-token prompt) and leave (one moving
rows), as the scheduler runs them (tests/decode_rows.py):

- here, the tiny Llama and Gemma at fp32, int8 and int4, as probed and with the spare row forced;
- here, no exported variant needs the spare row: the exporter's 4-bit MatMulNBits never run a lone
  row (export/single_rows.py), so rows agree without it and the probe pads nothing;
- the probe pads exactly when rows run without the spare row differ, here and on an emulated
  AVX2-only CPU (qemu's Haswell), on an int4 graph whose 4-bit MatMulNBits do run lone rows; and
  with the spare row they agree; there the exported int4 variant needs no spare row either;
- through the server with the spare row forced: staggered calls equal their solo outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxserve.export.exporter import export_model
from onnxserve.export.weight_only import RECIPES, quantize_model
from onnxserve.server.tasks.generation import fused

from onnxserve.enums import short_name
from onnxserve.repository import read_manifest
from onnxserve.v1 import common_pb2
from tests.conftest import Exported
from tests.decode_rows import alone_and_beside, open_graph
from tests.emulation import needs_qemu, run_script_on_haswell
from tests.test_continuous_batching import CALLS, MODEL, call, concurrently, slowed, wait_until_idle
from tests.test_weight_only import TINY_GATE

KINDS = [MODEL, "gemma3-causal-lm"]
PRECISIONS = ("fp32", "int8", "int4")
LONE_ROWS = "int4, lone rows"  # every MatMul at 4 bits, without export/single_rows.py's extra row
ROOT = Path(__file__).resolve().parents[1]

# On the emulated CPU: the stream as probed, then with the probe's spare row taken away.
_ON_HASWELL = """
import sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from tests.decode_rows import alone_and_beside, open_graph
graph = open_graph(sys.argv[2])
results = {"probe": np.array(graph.pads_solo_runs), **alone_and_beside(graph)}
graph.pads_solo_runs = False
results |= {f"unpadded_{name}": logits for name, logits in alone_and_beside(graph).items()}
"""


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> dict[str, Exported]:
    """Every precision written: the quantized variants' gate is loosened for tiny random models."""
    repository = tmp_path_factory.mktemp("repository")
    found = {}
    for kind in KINDS:
        version = export_model(
            str(checkpoint(kind)), repository, name=kind, precisions=PRECISIONS, generative_gate=TINY_GATE,
            show_progress=False,
        )  # fmt: skip
        found[kind] = Exported(kind, checkpoint(kind), version.parent)
    return found


@pytest.fixture(scope="module")
def graphs(exported) -> dict[str, dict[str, Path]]:
    """kind -> precision -> the variant's graph."""
    found = {}
    for kind, model in exported.items():
        variants = read_manifest(model.model_dir / "1").variants
        found[kind] = {
            short_name(common_pb2.Precision, v.precision): model.model_dir / "1" / v.files[0].path for v in variants
        }
        found[kind][LONE_ROWS] = model.model_dir / "1" / "lone_rows.onnx"
        fp32 = onnx.load(str(found[kind]["fp32"]))
        onnx.save(quantize_model(fp32, RECIPES["int4"]), str(found[kind][LONE_ROWS]))
    return found


def differing_steps(logits: dict[str, np.ndarray], prefix: str = "") -> list[int]:
    """The steps (0: after the prompt) whose logits differ alone and beside batchmates."""
    alone, beside = logits[f"{prefix}alone"], logits[f"{prefix}beside"]
    return [step for step in range(len(alone)) if not np.array_equal(alone[step], beside[step])]


@pytest.mark.parametrize("spare_row", ["probed", "forced"])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_stream_decodes_alike_alone_and_beside_batchmates(graphs, kind, precision, spare_row):
    graph = open_graph(graphs[kind][precision])
    if spare_row == "forced":
        graph.pads_solo_runs = True
    assert differing_steps(alone_and_beside(graph)) == []


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_no_variant_needs_the_spare_row(graphs, kind, precision):
    """Fails for int4 on an AVX2-only CPU (this project's EPYC) without export/single_rows.py."""
    graph = open_graph(graphs[kind][precision])
    assert not graph.pads_solo_runs
    assert differing_steps(alone_and_beside(graph)) == []


@pytest.mark.parametrize("precision", [*PRECISIONS, LONE_ROWS])
@pytest.mark.parametrize("kind", KINDS)
def test_here_the_probe_pads_exactly_when_unpadded_rows_differ(graphs, kind, precision):
    """On the CPU running the tests: on an AVX2-only one (this project's EPYC) lone rows of 4-bit
    MatMulNBits differ, so this fails if the probe missed it; on a VNNI one nothing differs."""
    graph = open_graph(graphs[kind][precision])
    probed = graph.pads_solo_runs
    graph.pads_solo_runs = False
    unpadded = differing_steps(alone_and_beside(graph))
    assert probed == bool(unpadded), f"the probe said {probed}; unpadded rows differ at {unpadded}"


@needs_qemu
def test_on_an_avx2_only_cpu_the_probe_pads_solo_rows_and_streams_agree(graphs, tmp_path):
    results = run_script_on_haswell(_ON_HASWELL, [str(ROOT), str(graphs[MODEL][LONE_ROWS])], tmp_path)
    unpadded = differing_steps(results, "unpadded_")
    assert bool(results["probe"]) == bool(unpadded), (
        f"the probe said {results['probe']}; unpadded rows differ at {unpadded}"
    )
    assert differing_steps(results) == []


@needs_qemu
def test_on_an_avx2_only_cpu_the_int4_variant_needs_no_spare_row(graphs, tmp_path):
    results = run_script_on_haswell(_ON_HASWELL, [str(ROOT), str(graphs[MODEL]["int4"])], tmp_path)
    assert not results["probe"]
    assert differing_steps(results, "unpadded_") == []


@pytest.fixture(scope="module")
def padded_server(exported, start_server):
    """The int4 Llama served with the spare row forced, whatever this machine's kernels."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused, "solo_runs_differ", lambda graph: True)
        server = start_server({MODEL: exported[MODEL]}, precision="int4", intra_op_threads=1)
        slowed(server)
        yield server


def test_staggered_calls_with_spare_rows_equal_their_solo_output(padded_server):
    generation = padded_server.server.registry.get(MODEL).pipeline
    assert generation.scheduler.graph.pads_solo_runs
    with padded_server.client() as client:
        solo = [call(client, *c) for c in CALLS]
        wait_until_idle(generation.stats)
        together = concurrently([lambda c=c: call(client, *c) for c in CALLS])
    assert together == solo
