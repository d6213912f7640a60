"""`make bench`'s and `make bench-generate`'s bookkeeping (the measurements themselves are too slow
for tests): precisions the export left out are skipped with the reason, the report is written even
when a run fails, and the generation bench's perplexity figures (checked on a tiny decoder)."""

from __future__ import annotations

import json

import pytest

import bench.__main__ as throughput
from bench import generation, generation_engines
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


def test_the_served_graph_scores_the_text_as_pytorch_does(export):
    """The bench's perplexity of onnxserve (step_perplexity on the served variant's graph, a token
    at a time) against PyTorch's (one forward pass) on the same ids, tiny Gemma 3 in fp32."""
    exported = export("gemma3-causal-lm")
    version_dir = max(version_dirs(exported.model_dir).items())[1]
    ids = [2, *range(10, 40)]
    job = {"prompt_ids": {generation_engines.PERPLEXITY_PROMPT: ids}, "threads": 1}
    served = generation_engines.scored({
        **job, "engine": "onnxserve-fp32", "precision": "fp32", "version_dir": str(version_dir), "pad_token_id": 0,
    })  # fmt: skip
    reference = generation_engines.scored({**job, "engine": "pytorch", "checkpoint": str(exported.checkpoint)})
    assert served["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-4)
    assert reference["perplexity"] > 1


def test_perplexity_against_the_reference_and_the_int4_aims():
    """Figures made up: PyTorch at perplexity 16, int4 at 16.2 (+1.25%) keeping 2 of 3 prompts whole,
    llama.cpp at 16.8 keeping 3, and splitting the short prompt otherwise by its own tokenizer."""
    results = {
        "pytorch": generation_figures(16.0, [[1, 2, 3]] * 3),
        "onnxserve-int4": generation_figures(16.2, [[1, 2, 3], [1, 2, 3], [1, 2, 4]]),
        "llama.cpp": {**generation_figures(16.8, [[1, 2, 3]] * 3), "tokenized_otherwise": ["short"]},
    }
    ratios = generation.derived(results)
    assert ratios["onnxserve-int4"]["perplexity_vs_reference"] == pytest.approx(1.0125)
    assert ratios["pytorch"]["perplexity_vs_reference"] == 1
    found = {aim["aim"]: aim for aim in generation.aims(results, ratios)}
    assert found["int4: perplexity within 2% of PyTorch's"]["met"]
    assert found["int4: greedy ids equal PyTorch's on as many prompts as llama.cpp's"] == {
        "aim": "int4: greedy ids equal PyTorch's on as many prompts as llama.cpp's", "engine": "onnxserve-int4",
        "value": 2, "met": False,
    }  # fmt: skip
    assert generation.prompt_mismatches(results, {"short": [1, 2], "long": [1, 2, 3]}) == [
        "llama.cpp: its own tokenizer splits the short prompt otherwise (it was fed the bench's ids)"
    ]
    assert generation._perplexity("onnxserve-int4", results["onnxserve-int4"], 1.0125) == "16.200 (+1.25%)"


def generation_figures(perplexity: float, outputs: list[list[int]]) -> dict:
    """One engine's figures: the short and long prompts' outputs are the first two, the streams all."""
    single = {
        name: {"prompt_tokens": tokens, "prefill_ms": 10.0, "decode_tokens_per_s": 20.0, "token_ids": ids}
        for name, tokens, ids in (("short", 2, outputs[0]), ("long", 3, outputs[1]))
    }
    streams = [{"concurrency": 1, "calls": 1, "tokens_per_s": 20.0, "time_to_first_token_p50_ms": 50.0,
                "token_ids": outputs[2:]}]  # fmt: skip
    return {"single": single, "streams": streams, "peak_rss_bytes": 1 << 29, "perplexity": perplexity}
