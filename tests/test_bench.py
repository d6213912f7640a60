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


def test_ratios_take_the_raw_sessions_best_batch_and_the_aims_read_them():
    """Figures made up: the raw session runs 100/s at batch 1 and 300/s at batch 32; the server
    280/s at c=32 is 0.93x the best, 1.4x the same-batch figure being c=8's raw 200/s."""

    def made(engine: str, concurrency: int, rate: float, p50: float, workload: str = "short"):
        return throughput_measurement(engine, workload, concurrency, rate, p50)

    results = [
        made("raw", 1, 100, 5.0), made("raw", 8, 200, 20.0), made("raw", 32, 300, 60.0),
        made("server", 1, 90, 5.5), made("server", 8, 280, 25.0), made("server", 32, 280, 90.0),
        made("pipeline", 1, 50, 12.0), made("pipeline", 8, 100, 50.0), made("pipeline", 32, 120, 200.0),
    ]  # fmt: skip
    args = throughput.parse(["--tasks", "encode", "--workloads", "short", "--precisions", "fp32"])
    found = {r.cell.concurrency: r for r in throughput.ratios(results, args)}
    assert [found[c].vs_raw for c in (1, 8, 32)] == [0.9, 1.4, 0.93]
    assert [found[c].vs_raw_best for c in (1, 8, 32)] == [0.3, 0.93, 0.93]
    assert found[1].added_p50_ms == 0.5 and found[8].vs_pipeline == 2.8
    aims = throughput.aims(list(found.values()), ["fp32"])["fp32"]
    assert aims["short texts: server >= 0.9x the raw session's best throughput at c=8 and c=32"] == {
        "worst": 0.93, "bound": 0.9, "met": True,
    }  # fmt: skip
    assert aims["short texts: p50 at c=1 within 1 ms of the raw session's batch-1 p50"]["met"]
    assert not aims["short texts: server >= 2x the transformers pipeline at c=1, 8 and 32"]["met"]  # 90 / 50
    assert "medium texts: server >= 0.95x the raw session's best throughput at c=8" not in aims  # not measured


def throughput_measurement(engine: str, workload: str, concurrency: int, rate: float, p50: float):
    return throughput.Measurement(
        engine=engine, precision="fp32", task="encode", workload=workload, concurrency=concurrency,
        requests=100, seconds=1.0, throughput=rate, p50_ms=p50, p99_ms=2 * p50, mean_batch=1.0,
    )  # fmt: skip
