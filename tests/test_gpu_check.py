"""`make gpu-check` (bench/gpu_check.py), where no GPU is lent: with `--device cuda` it stops at once
naming what is missing; with `--device cpu` the whole check runs, the CPU standing in for the device
under test, on an encoder, a classifier and a fused decoder; its log readers find what ONNX Runtime
writes when nodes fall back to the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from onnxserve.server.runtime import sessions

from bench import gpu_check

ROOT = Path(__file__).resolve().parent.parent
CUDA, CPU = sessions.CUDA, sessions.CPU

# What ONNX Runtime's verbose session log says when some nodes of a CUDA session fall back to the CPU
# (the format of session_state.cc's VerifyEachNodeIsAssignedToAnEp, and transformer_memcpy.cc).
SPLIT_LOG = f"""\
2026-12-02 04:37:44.3 [W:onnxruntime:, transformer_memcpy.cc:74 ApplyImpl] 6 Memcpy nodes are added to the graph main_graph for CUDAExecutionProvider.
2026-12-02 04:37:44.4 [V:onnxruntime:, session_state.cc:1578 VerifyEachNodeIsAssignedToAnEp] Node placements
2026-12-02 04:37:44.4 [V:onnxruntime:, session_state.cc:1581 VerifyEachNodeIsAssignedToAnEp]  Node(s) placed on [{CPU}]. Number of nodes: 3
2026-12-02 04:37:44.4 [V:onnxruntime:, session_state.cc:1581 VerifyEachNodeIsAssignedToAnEp]   Shape (last/Shape)
2026-12-02 04:37:44.4 [V:onnxruntime:, session_state.cc:1581 VerifyEachNodeIsAssignedToAnEp]   GroupQueryAttention (layers.0.attn/GroupQueryAttention)
2026-12-02 04:37:44.4 [V:onnxruntime:, session_state.cc:1581 VerifyEachNodeIsAssignedToAnEp]   GroupQueryAttention (layers.1.attn/GroupQueryAttention)
2026-12-02 04:37:44.4 [V:onnxruntime:, session_state.cc:1581 VerifyEachNodeIsAssignedToAnEp]  Node(s) placed on [{CUDA}]. Number of nodes: 2
2026-12-02 04:37:44.4 [V:onnxruntime:, session_state.cc:1581 VerifyEachNodeIsAssignedToAnEp]   MatMul (lm_head)
2026-12-02 04:37:44.4 [V:onnxruntime:, session_state.cc:1581 VerifyEachNodeIsAssignedToAnEp]   MemcpyToHost (Memcpy_token_0)
"""  # noqa: E501


def test_placement_log_is_read_and_cpu_fallback_of_heavy_ops_fails() -> None:
    placement = gpu_check.parse_placement(SPLIT_LOG)
    assert placement.ops == {CPU: {"Shape": 1, "GroupQueryAttention": 2}, CUDA: {"MatMul": 1, "MemcpyToHost": 1}}
    assert placement.memcpy == 6
    passed, detail = gpu_check.judge_placement(placement, "cuda", fused_refused=False)
    assert not passed and "['GroupQueryAttention']" in detail
    # A refused fp32 fused decoder: the log must show the reason for the refusal.
    assert gpu_check.judge_placement(placement, "cuda", fused_refused=True)[0]
    del placement.ops[CPU]["GroupQueryAttention"]
    assert gpu_check.judge_placement(placement, "cuda", fused_refused=False)[0]
    assert not gpu_check.judge_placement(placement, "cuda", fused_refused=True)[0]
    assert not gpu_check.judge_placement(gpu_check.Placement(), "cuda", fused_refused=False)[0]


def test_server_log_findings_are_counted() -> None:
    log = (
        SPLIT_LOG
        + "W onnxruntime: Some nodes were not assigned to the preferred execution providers which may ...\n"
        + "WARNING model x: outputs move by 0.004 (relative) when batched with other texts, over the limit of 1e-03; "
        + "its requests will not be batched together (each runs with its own texts only)\n"
    )
    assert gpu_check.log_findings(log) == {"memcpy nodes": 6, "not assigned": 1, "unmerged": 1}
    assert gpu_check.log_findings("") == {"memcpy nodes": 0, "not assigned": 0, "unmerged": 0}


def test_cuda_check_stops_at_once_naming_what_is_missing(tmp_path: Path) -> None:
    sessions.cuda_problem.cache_clear()
    if sessions.cuda_problem() is None:
        pytest.skip("the CUDA provider can be created here")
    command = [sys.executable, "-m", "bench.gpu_check", "--device", "cuda", "--work", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"gpu-check: the CUDA provider cannot run here: {sessions.cuda_problem()}" in done.stderr
    assert "exporting" not in done.stdout and not list(tmp_path.iterdir())  # nothing built before it


def test_the_whole_check_runs_with_the_cpu_standing_in(tmp_path: Path) -> None:
    kinds = ["bert-feature-extraction", "bert-sequence-classification", "llama-causal-lm"]
    command = [
        sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--kinds", *kinds,
        "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results"),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [results] = (tmp_path / "results").glob("gpu-check-cpu-*.json")
    report = json.loads(results.read_text())
    assert report["passed"] and report["device"] == "cpu"
    names = [check["name"] for check in report["checks"]]
    for precision in ("fp32", "fp16"):
        server = f"cpu-{precision}"
        assert f"{server} bert-feature-extraction Encode" in names
        assert f"{server} bert-sequence-classification Classify" in names
        for mode in ("greedy", "beams=3", "12 concurrent"):
            assert f"{server} llama-causal-lm {mode}" in names
        assert f"placement llama-causal-lm model.{precision}.onnx" in names
    assert set(report["logs"]) == {"reference", "cpu-fp32", "cpu-fp16"}
    greedy = next(c for c in report["checks"] if c["name"] == "cpu-fp32 llama-causal-lm greedy")
    assert "common prefixes [16, 16, 16, 16] of [16, 16, 16, 16]" in greedy["detail"]
