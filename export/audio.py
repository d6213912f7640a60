"""Speech checkpoints: their transformers feature extractor (preprocessor_config.json), shipped in
the version as it is and checked here against the server's numpy reproduction on sample
waveforms, so that a feature extractor the server cannot reproduce is refused at export instead of
served with other numbers; and, for CTC models, the vocabulary and decoding options of their
Wav2Vec2CTCTokenizer (not a `tokenizers` tokenizer), which the server decodes with."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from onnxserve.export.errors import ExportError
from onnxserve.server.tasks.audio import (
    FEATURE_EXTRACTOR_FILE,
    FeatureExtractorConfig,
    kaldi_fbank,
    normalize,
    whisper_log_mel,
)
from onnxserve.server.tasks.ctc_speech_recognition import CTC_VOCABULARY_FILE
from transformers import PretrainedConfig

#: How far the server's features may be from the extractor's: float32 rounding only.
MAX_FEATURE_DIFF = 1e-4


def load_feature_extractor(checkpoint: Path) -> Any:
    from transformers import AutoFeatureExtractor

    try:
        return AutoFeatureExtractor.from_pretrained(checkpoint)
    except (OSError, ValueError, ImportError) as error:
        raise ExportError(
            f"cannot load {checkpoint}'s feature extractor ({FEATURE_EXTRACTOR_FILE}): {error}"
        ) from error


def sample_waveforms(sampling_rate: int) -> list[np.ndarray]:
    """Mono waveforms of varied lengths and levels (a tenth of a second to 3 s, silence to loud),
    for the check here and the validation's inputs."""
    rng = np.random.default_rng(16)
    waves = []
    for seconds, level in ((0.1, 0.01), (0.5, 0.5), (1.0, 0.05), (3.0, 0.3)):
        t = np.arange(int(seconds * sampling_rate)) / sampling_rate
        tone = np.sin(2 * np.pi * (180 + 40 * np.sin(2 * np.pi * t)) * t)
        waves.append((level * (tone + 0.2 * rng.standard_normal(t.size))).astype(np.float32))
    return waves


def sample_input_values(sampling_rate: int = 16000) -> list[np.ndarray]:
    """The sample waveforms normalized as wav2vec2's feature extractor does: the validation's
    inputs of the heads that take waveforms."""
    return [normalize(wave) for wave in sample_waveforms(sampling_rate)]


def _waveform_features(config: FeatureExtractorConfig, wave: np.ndarray) -> np.ndarray:
    return normalize(wave) if config.do_normalize else wave


def _log_mel_features(config: FeatureExtractorConfig, wave: np.ndarray) -> np.ndarray:
    return whisper_log_mel(wave, config)


def _fbank_features(config: FeatureExtractorConfig, wave: np.ndarray) -> np.ndarray:
    return kaldi_fbank(wave, config)


#: The feature extractors the server reproduces (server/tasks/audio.py): their output's name and
#: the server's computation of it.
REPRODUCED = {
    "Wav2Vec2FeatureExtractor": ("input_values", _waveform_features),
    "WhisperFeatureExtractor": ("input_features", _log_mel_features),
    "Speech2TextFeatureExtractor": ("input_features", _fbank_features),
}
#: Extractors that add random noise when their dither is set (the others ignore the key).
_DITHERING = ("WhisperFeatureExtractor", "Speech2TextFeatureExtractor")


def check_feature_extractor(extractor: Any) -> FeatureExtractorConfig:
    """The server's reading of the extractor; ExportError if it is not one the server reproduces
    or the server's features differ from its own on the sample waveforms."""
    name = type(extractor).__name__
    if name not in REPRODUCED:
        raise ExportError(f"{name} is not supported: the server reproduces {', '.join(REPRODUCED)}")
    output, served = REPRODUCED[name]
    dither = getattr(extractor, "dither", 0.0) if name in _DITHERING else 0.0
    if dither:
        raise ExportError(f"{name} dithers (adds random noise, dither={dither}): the server does not")
    config = FeatureExtractorConfig.from_dict(json.loads(extractor.to_json_string()))
    for wave in sample_waveforms(config.sampling_rate):
        expected = extractor(wave, sampling_rate=config.sampling_rate, return_tensors="np")[output][0]
        got = served(config, wave)
        if got.shape != expected.shape or float(np.abs(got - expected).max()) > MAX_FEATURE_DIFF:
            raise ExportError(f"the server cannot reproduce {name}'s {output} on a {len(wave)}-sample waveform")
    return config


def ctc_vocabulary(checkpoint: Path, config: PretrainedConfig) -> dict[str, Any]:
    """What the server's CTCVocabulary reads: the token of every id the logits cover (as the
    tokenizer converts ids, unknown ones to its unk token), the blank and the word delimiter,
    the text clean-ups, and the waveform samples per logit frame (for offsets in seconds)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError, TypeError) as error:
        raise ExportError(f"cannot load {checkpoint}'s CTC tokenizer (vocab.json): {error}") from error
    delimiter = getattr(tokenizer, "word_delimiter_token", None)
    if delimiter is None or tokenizer.pad_token is None:
        raise ExportError(
            f"{type(tokenizer).__name__} is not a CTC tokenizer (Wav2Vec2CTCTokenizer): it has no word delimiter "
            "or pad (blank) token"
        )
    return {
        "tokens": [tokenizer.convert_ids_to_tokens(i) for i in range(config.vocab_size)],
        "pad_token": tokenizer.pad_token,
        "word_delimiter_token": delimiter,
        "replace_word_delimiter_char": tokenizer.replace_word_delimiter_char,
        "do_lower_case": bool(tokenizer.do_lower_case),
        "clean_up_tokenization_spaces": bool(tokenizer.clean_up_tokenization_spaces),
        "inputs_to_logits_ratio": int(config.inputs_to_logits_ratio),
    }


@dataclass(frozen=True)
class SpeechFiles:
    """What a speech model's version ships besides its graphs: the feature extractor, and CTC
    models' vocabulary."""

    extractor: Any
    vocabulary: dict[str, Any] | None = None

    def write(self, stage: Path) -> None:
        """preprocessor_config.json (and the CTC vocabulary) into the version's staging folder."""
        self.extractor.to_json_file(stage / FEATURE_EXTRACTOR_FILE)
        if self.vocabulary is not None:
            text = json.dumps(self.vocabulary, ensure_ascii=False, indent=1)
            (stage / CTC_VOCABULARY_FILE).write_text(text, encoding="utf-8")


def read_speech(checkpoint: Path, task: str, config: PretrainedConfig) -> SpeechFiles:
    """The checkpoint's feature extractor, checked against the server's reproduction, and the CTC
    vocabulary of CTC models."""
    extractor = load_feature_extractor(checkpoint)
    check_feature_extractor(extractor)
    vocabulary = ctc_vocabulary(checkpoint, config) if task == "ctc-speech-recognition" else None
    return SpeechFiles(extractor, vocabulary)
