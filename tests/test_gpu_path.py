"""The GPU path, proven where a CPU can prove it (docs/gpu.md):

- the fp16 variant keeps a decoder's KV cache in fp16 (inputs and outputs, no Cast around the
  attention), and its greedy ids on the serving side's shared buffers still equal generate();
- an fp16 optimum decoder (GPT-2) keeps its cache in fp16 too and passes its gate;
- the start-up check creates the CUDA provider rather than trusting the provider list: where it
  cannot be created (this machine lacks CUDA 13's libraries; the driver is faked present so that
  the check gets as far as creating it), `--device auto` serves on the CPU and logs why, and
  `--device cuda` stops `onnxserve serve` at start with the reason and exit code 1, no traceback;
- a fused decoder whose attention is not fp16 is refused on CUDA, naming why, and `auto` on CUDA
  takes the fp16 variant;
- the exporter validates fp16 on the GPU where one is usable (never the CPU's figures in its name);
- the batch-merge drift limit follows the precision: fp16's sums, reordered by other batch shapes,
  may move by more than fp32's limit and still be far inside fp16's gate."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxruntime.capi import build_and_package_info
from onnxserve.export import validate
from onnxserve.export.decoder_graph import build_decoder_graph
from onnxserve.export.optimize import KV_CACHE_PREFIXES, to_fp16
from onnxserve.server.config.settings import ModelSettings
from onnxserve.server.errors import ModelLoadError
from onnxserve.server.models.loading import choose_variant, load_model
from onnxserve.server.runtime import batching, sessions
from onnxserve.server.runtime.sessions import Session, SessionSettings
from onnxserve.server.tasks.base import Executors
from onnxserve.server.tasks.generation import fused
from onnxserve.server.tasks.generation.fused import FusedBatch, FusedGraph
from transformers import AutoModelForCausalLM

from onnxserve.repository import read_manifest
from onnxserve.v1 import common_pb2, manifest_pb2, models_pb2
from tests import generation_reference as reference
from tests.conftest import Exported

FUSED_KINDS = ["llama-causal-lm", "gemma3-causal-lm"]
NEW_TOKENS = 12
FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


def _io_types(graph: onnx.GraphProto) -> dict[str, int]:
    return {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)}


def _cache_names(graph: onnx.GraphProto) -> set[str]:
    return {name for name in _io_types(graph) if name.startswith(KV_CACHE_PREFIXES)}


def assert_fp16_cache(graph: onnx.GraphProto) -> None:
    """Every cache input and output is float16, the other float I/O float32, and no Cast reads or
    writes a cache tensor (the fp32-cache conversion put one on each, both ways)."""
    types = _io_types(graph)
    cache = _cache_names(graph)
    assert cache and {types[name] for name in cache} == {FLOAT16}
    assert {types[name] for name in types.keys() - cache} <= {FLOAT, onnx.TensorProto.INT64, onnx.TensorProto.INT32}
    assert types.get("logits") == FLOAT
    casts = [node for node in graph.node if node.op_type == "Cast"]
    assert not [node.name for node in casts if cache & {*node.input, *node.output}]


@pytest.fixture(scope="module")
def fp16_fused(checkpoint: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each kind's fused graph converted to fp16 as the exporter does."""
    graphs = {}
    for kind in FUSED_KINDS:
        folder = tmp_path_factory.mktemp(kind)
        model = AutoModelForCausalLM.from_pretrained(checkpoint(kind))
        build_decoder_graph(model, folder / "model.fp32.onnx", max_length=64)
        to_fp16(folder / "model.fp32.onnx", folder / "model.fp16.onnx")
        graphs[kind] = folder / "model.fp16.onnx"
    return graphs


@pytest.mark.parametrize("kind", FUSED_KINDS)
def test_fp16_fused_decoder_keeps_its_kv_cache_in_fp16(fp16_fused: dict[str, Path], kind: str) -> None:
    graph = onnx.load(str(fp16_fused[kind])).graph
    assert_fp16_cache(graph)
    # GroupQueryAttention reads the past and writes the present directly.
    attention = [node for node in graph.node if node.op_type == "GroupQueryAttention"]
    assert attention and all(node.input[3].startswith("past_key_values.") for node in attention)
    assert all(node.output[1].startswith("present.") for node in attention)


@pytest.mark.parametrize("cache_device", [None, "cpu"], ids=["numpy", "ortvalue"])
@pytest.mark.parametrize("kind", FUSED_KINDS)
def test_fp16_fused_greedy_ids_equal_generate(
    fp16_fused: dict[str, Path], checkpoint: Callable[[str], Path], kind: str, cache_device: str | None
) -> None:
    """The fp16 cache allocated by the serving side (numpy on the CPU; OrtValues bound by address,
    the CUDA code path) decodes each prompt, batched, as PyTorch fp32 does."""
    path = checkpoint(kind)
    graph = FusedGraph(Session(fp16_fused[kind], SessionSettings(intra_op_threads=1)), cache_device=cache_device)
    assert {past.dtype.__name__ for past in graph.past} == {"float16"}
    tokenize = reference.tokenizer(path)
    prompts = [tokenize(prompt).input_ids for prompt in reference.PROMPTS]
    batch = FusedBatch(graph, rows=len(prompts), length=max(map(len, prompts)) + NEW_TOKENS)
    generated = [batch.prefill(0, prompts).argmax(axis=-1)]
    while len(generated) < NEW_TOKENS:
        generated.append(batch.decode(generated[-1]).argmax(axis=-1))
    ends = set(reference.eos_ids(path, seq2seq=False))
    for row, prompt in enumerate(reference.PROMPTS):
        ids = [int(step[row]) for step in generated]
        ids = ids[: next((i + 1 for i, token in enumerate(ids) if token in ends), len(ids))]
        assert ids == reference.generate_ids(path, [prompt], max_new_tokens=NEW_TOKENS, do_sample=False)[0], prompt


@pytest.fixture(scope="module")
def gpt2_fp16(export: Callable[..., Exported]) -> Path:
    return export("gpt2-causal-lm", precisions=("fp32", "fp16")).model_dir / "1"


def test_fp16_optimum_decoder_keeps_its_kv_cache_in_fp16_and_passes_its_gate(gpt2_fp16: Path) -> None:
    assert_fp16_cache(onnx.load(str(gpt2_fp16 / "model.fp16.onnx")).graph)
    [fp16] = [v for v in read_manifest(gpt2_fp16).variants if v.files[0].path == "model.fp16.onnx"]
    assert fp16.validation.passed, list(fp16.validation.failures)
    assert "fp16 KV cache" in fp16.recipe


# --- the start-up provider check -------------------------------------------------------------------

CUDA_MAJOR = build_and_package_info.cuda_version.split(".")[0]
# Run as `onnxserve serve`, with the driver's device count faked to 1 (as in a container on a GPU
# node whose image lacks the CUDA libraries the wheel was built for).
SERVE_WITH_A_FAKED_DRIVER = (
    "import sys; from onnxserve.server.runtime import sessions; sessions.cuda_device_count = lambda: 1; "
    "from onnxserve.cli import main; main(sys.argv[1:])"
)


@pytest.fixture
def driver_without_cuda_libraries(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    sessions.cuda_problem.cache_clear()
    if sessions.cuda_problem() is None:
        pytest.skip("the CUDA provider can be created here: nothing is missing to test")
    sessions.cuda_problem.cache_clear()
    monkeypatch.setattr(sessions, "cuda_device_count", lambda: 1)
    yield
    sessions.cuda_problem.cache_clear()


def test_the_check_creates_the_provider_and_names_what_is_missing(driver_without_cuda_libraries) -> None:
    problem = sessions.cuda_problem()
    assert problem is not None and "the CUDA provider could not be created" in problem
    assert f"needs CUDA {CUDA_MAJOR}.x and cuDNN 9" in problem and f"libcublasLt.so.{CUDA_MAJOR}" in problem


def test_auto_falls_back_to_the_cpu_saying_why(driver_without_cuda_libraries, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger=sessions.__name__):
        assert sessions.resolve_device("auto") == "cpu"
    assert "--device auto: serving on the CPU, since the CUDA provider cannot run here" in caplog.text
    assert "could not be created" in caplog.text


def test_device_cuda_fails_at_once_with_the_reason(driver_without_cuda_libraries) -> None:
    with pytest.raises(ModelLoadError, match=rf"--device cuda was asked for.*needs CUDA {CUDA_MAJOR}"):
        sessions.resolve_device("cuda")
    assert sessions.resolve_device("cpu") == "cpu"


def test_serve_with_device_cuda_stops_at_start_without_a_traceback(tmp_path: Path) -> None:
    sessions.cuda_problem.cache_clear()
    if sessions.cuda_problem() is None:
        pytest.skip("the CUDA provider can be created here")
    command = [sys.executable, "-c", SERVE_WITH_A_FAKED_DRIVER, "serve", "--repository", str(tmp_path)]
    done = subprocess.run([*command, "--device", "cuda", "--port", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    output = " ".join((done.stdout + done.stderr).split())  # rich wraps long lines
    assert "cannot serve: --device cuda was asked for, but the CUDA provider cannot run here" in output
    assert f"needs CUDA {CUDA_MAJOR}.x" in output
    assert "Traceback" not in output


# --- fused decoders on CUDA -----------------------------------------------------------------------


def test_a_fused_decoder_not_in_fp16_is_refused_on_cuda(
    checkpoint: Callable[[str], Path], fp16_fused: dict[str, Path], tmp_path: Path
) -> None:
    """The session is a CPU one told it runs on CUDA: what is checked is the graph's attention type."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint("llama-causal-lm"))
    build_decoder_graph(model, tmp_path / "model.fp32.onnx", max_length=64)
    fp32 = Session(tmp_path / "model.fp32.onnx", SessionSettings(intra_op_threads=1))
    FusedGraph(fp32)  # on the CPU it serves
    fp32.provider = sessions.CUDA
    with pytest.raises(ModelLoadError, match=r"GroupQueryAttention has no float32 CUDA kernel.*fp16 variant"):
        FusedGraph(fp32)
    fp16 = Session(fp16_fused["llama-causal-lm"], SessionSettings(intra_op_threads=1))
    fp16.provider = sessions.CUDA
    assert FusedGraph(fp16).cache_device == "cuda"


def test_loading_a_fp32_fused_decoder_on_cuda_fails_naming_why(
    export: Callable[..., Exported], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the whole load (the export's probes, then the pipeline): the CPU stands in for CUDA
    in the fused graph's device check, so the refusal is what a GPU server would give."""
    exported = export("llama-causal-lm", precisions=("fp32",))
    monkeypatch.setattr(fused, "CUDA", sessions.CPU)
    with ThreadPoolExecutor(1) as pool:
        model = load_model(
            exported.name, 1, exported.model_dir / "1", "cpu", ModelSettings(warmup=False),
            Executors(tokenizing=pool, generation=pool),
        )  # fmt: skip
    assert model.state == models_pb2.MODEL_STATE_FAILED
    assert "GroupQueryAttention has no float32 CUDA kernel" in model.reason and "fp16 variant" in model.reason


def test_auto_on_cuda_takes_the_fp16_variant() -> None:
    manifest = manifest_pb2.Manifest(
        variants=[manifest_pb2.Variant(precision=p) for p in common_pb2.Precision.values() if p]
    )
    assert choose_variant(manifest, "auto", "cuda").precision == common_pb2.PRECISION_FP16
    assert choose_variant(manifest, "auto", "cpu").precision == common_pb2.PRECISION_INT8


# --- validation on the GPU --------------------------------------------------------------------------


def test_fp16_is_validated_on_a_usable_gpu(monkeypatch: pytest.MonkeyPatch, fp16_fused: dict[str, Path]) -> None:
    monkeypatch.setattr(validate, "cuda_problem", lambda: "no driver")
    assert {p: validate.validation_device(p) for p in ("fp32", "fp16", "int8")} == dict.fromkeys(
        ("fp32", "fp16", "int8"), "cpu"
    )
    monkeypatch.setattr(validate, "cuda_problem", lambda: None)
    assert {p: validate.validation_device(p) for p in ("fp32", "fp16", "int8")} == {
        "fp32": "cpu", "fp16": "cuda", "int8": "cpu",
    }  # fmt: skip
    sessions.cuda_problem.cache_clear()
    if sessions.cuda_problem() is None:
        assert validate._session(fp16_fused["llama-causal-lm"], "cuda").get_providers()[0] == sessions.CUDA
    else:  # onnxruntime falls back to the CPU silently: the validator must not
        with pytest.raises(validate.NotRunnable, match="could not create the CUDA provider"):
            validate._session(fp16_fused["llama-causal-lm"], "cuda")


# --- the batch-merge drift limit ----------------------------------------------------------------------


class _Texts:
    """A tokenizer stand-in: the probe texts' lengths are all the forward below looks at."""

    def encode(self, texts: list[str]) -> list[int]:
        return [len(text) for text in texts]


def _forward_drifting_by(drift: float) -> batching.Forward:
    """Each row's output moves by `drift` (relative) when it runs beside other rows, as reordered
    fp16 sums do."""

    def forward(batch: list[int]) -> list[dict[str, np.ndarray]]:
        scale = 1.0 if len(batch) == 1 else 1.0 + drift
        return [{"x": np.full(4, float(length)) * scale} for length in batch]

    return forward


def test_the_drift_limit_is_the_precisions(caplog) -> None:
    forward = _forward_drifting_by(3e-3)
    assert batching.batchmate_drift(forward, _Texts().encode(list(batching.PROBE_TEXTS))) == pytest.approx(3e-3)
    merges = {
        name: batching.merges_safely(name, forward, _Texts(), precision)
        for name, precision in (("fp32", common_pb2.PRECISION_FP32), ("fp16", common_pb2.PRECISION_FP16),
                                ("int8", common_pb2.PRECISION_INT8))
    }  # fmt: skip
    assert merges == {"fp32": False, "fp16": True, "int8": False}
    assert "model fp32: outputs move by 0.003" in caplog.text and "over the limit of 1e-03" in caplog.text
    # What the probe exists to catch, per-tensor int8's 0.16, is refused at fp16's limit too.
    assert not batching.merges_safely("scaled", _forward_drifting_by(0.16), _Texts(), common_pb2.PRECISION_FP16)
