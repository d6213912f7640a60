"""`make bench`'s bookkeeping (the measurements themselves are too slow for tests): precisions the
export left out are skipped with the reason, and the report is written even when a run fails."""

from __future__ import annotations

import json

import pytest

import bench.__main__ as throughput
from bench.minilm import Model
from onnxserve.repository import version_dirs

KIND = "bert-sequence-classification"


def test_a_precision_the_export_left_out_is_skipped_with_the_reason(export):
    both, fp32_only = export(KIND, precisions=("fp32", "int8")), export(KIND, precisions=("fp32",))
    models = {
        name: Model(name, exported.checkpoint, max(version_dirs(exported.model_dir).items())[1])
        for name, exported in (("both", both), ("fp32-only", fp32_only))
    }
    kept, skipped = throughput.exported_precisions(models, ["fp32", "int8"])
    assert kept == ["fp32"] and list(skipped) == ["int8"]
    assert "fp32-only" in skipped["int8"] and "both" not in skipped["int8"]


def test_the_report_keeps_what_ran_when_a_run_fails(tmp_path, monkeypatch):
    cell = throughput.Cell("encode", "short", 1)
    sample = throughput.Sample(latencies=[0.01, 0.02], seconds=0.03, batch_sizes=[1, 1])

    def run(args, results):
        args.precisions, args.skipped = ["fp32"], {"int8": "not exported for all-MiniLM-L6-v2"}
        results.append(throughput.measurement("raw", "fp32", cell, sample))
        raise RuntimeError("the server died")

    monkeypatch.setattr(throughput, "run", run)
    monkeypatch.setattr(throughput, "RESULTS", tmp_path)
    with pytest.raises(RuntimeError, match="the server died"):
        throughput.main(["--work", str(tmp_path / "work"), "--tasks", "encode", "--workloads", "short",
                         "--concurrency", "1"])
    [written] = tmp_path.glob("throughput-*.json")
    report = json.loads(written.read_text())
    assert report["failure"] == "RuntimeError: the server died"
    assert report["skipped"] == {"int8": "not exported for all-MiniLM-L6-v2"}
    assert [(m["engine"], m["precision"], m["requests"]) for m in report["measurements"]] == [("raw", "fp32", 2)]
