"""The gate of Whisper's fused decoder graphs (export/whisper_graph.py) against PyTorch, as the
exporter judges Whisper's other graphs (server/quality/gates.py, the variant's gate): the sample
clips' log-mel features (export/audio.py) through PyTorch's encoder, then from the transcription
prompt the fused graphs run as the server runs them (cross.py: the rows' encoder keys projected
into a shared batch, a prefill of all but the prompt's last token, then a decode step of it), and
the step's logits compared with the PyTorch decoder's at the same position. So both of the
server's paths, per-row positions and cross-attention of rows over different audio are judged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from onnxserve.export.audio import sample_waveforms
from onnxserve.server.quality.gates import GATES, Sample, judge_outputs
from onnxserve.server.runtime.sessions import Session, SessionSettings
from onnxserve.server.tasks.generation.cross import CrossGraph
from transformers import GenerationConfig, PreTrainedModel, WhisperFeatureExtractor

from onnxserve.v1 import manifest_pb2


def transcription_prompt(generation: GenerationConfig, start: int) -> list[int]:
    """<|startoftranscript|>, then <|en|> and <|transcribe|> where the model has them, then
    <|notimestamps|>: what an English transcription starts from."""
    languages = getattr(generation, "lang_to_id", None) or {}
    tasks = getattr(generation, "task_to_id", None) or {}
    prompt = [start, *([languages["<|en|>"]] if "<|en|>" in languages else [])]
    prompt += [tasks["transcribe"]] if "transcribe" in tasks else []
    return [*prompt, generation.no_timestamps_token_id]


def judge_whisper_graphs(model: PreTrainedModel, graphs: dict[str, Path], precision: str) -> manifest_pb2.Validation:
    """The figures of the graphs `graphs` ({"fused_decoder": ..., "cross_attention": ...}) of
    `model` on the sample clips, and the verdict of the precision's gate."""
    extractor = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)
    waves = sample_waveforms(extractor.sampling_rate)
    features = extractor(waves, sampling_rate=extractor.sampling_rate, return_tensors="pt").input_features
    prompt = transcription_prompt(model.generation_config, model.config.decoder_start_token_id)
    with torch.inference_mode():
        hidden = model.model.encoder(features).last_hidden_state
        ids = torch.tensor([prompt] * len(waves))
        reference = model(encoder_outputs=(hidden,), decoder_input_ids=ids).logits[:, -1].numpy()
    sessions = (Session(graphs[role], SessionSettings()) for role in ("fused_decoder", "cross_attention"))
    batch = CrossGraph(*sessions).batch(rows=len(waves), length=len(prompt))
    batch.prefill(0, [prompt[:-1]] * len(waves), hidden.numpy())
    served = batch.decode(np.full(len(waves), prompt[-1]))

    def samples(logits: np.ndarray) -> list[Sample]:
        return [Sample(row, row) for row in logits]

    return judge_outputs(samples(reference), samples(served), logits=True, gate=GATES[precision])
