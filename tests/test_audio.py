"""server/tasks/audio.py against transformers and libsndfile: Whisper's log-mel spectrogram and
wav2vec2's normalization equal transformers' feature extractors within 1e-4 on 16 kHz input;
files of every format the contract names decode to the samples libsndfile reads; channels are
averaged; resampling keeps a tone's samples; and each bad input is refused naming its problem."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from onnxserve.server.errors import InvalidArgument
from onnxserve.server.tasks import audio
from transformers import Speech2TextFeatureExtractor, Wav2Vec2FeatureExtractor, WhisperFeatureExtractor
from transformers.audio_utils import mel_filter_bank

from onnxserve.v1 import inference_pb2
from tests.speech import RATE, encoded, speech_like

MAX_SECONDS = 60.0
FEATURE_TOLERANCE = 1e-4


def file_audio(data: bytes) -> inference_pb2.Audio:
    return inference_pb2.Audio(data=data)


def raw_audio(samples: np.ndarray, rate: int, channels: int = 1) -> inference_pb2.Audio:
    raw = inference_pb2.RawAudio(samples=samples.astype("<f4").tobytes(), sample_rate=rate, channels=channels)
    return inference_pb2.Audio(raw=raw)


def config_of(extractor) -> audio.FeatureExtractorConfig:
    """The server's reading of the extractor as the exporter ships it (preprocessor_config.json)."""
    return audio.FeatureExtractorConfig.from_dict(json.loads(extractor.to_json_string()))


# ---------------------------------------------------------------------------------------------
# Features


@pytest.mark.parametrize("mel_bins", [80, 128])
def test_mel_filter_bank_is_transformers(mel_bins: int) -> None:
    expected = mel_filter_bank(201, mel_bins, 0.0, 8000.0, RATE, norm="slaney", mel_scale="slaney")
    np.testing.assert_allclose(audio.mel_filter_bank(201, mel_bins, 0.0, 8000.0, RATE), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seconds", [0.05, 1.0, 7.3, 30.0, 34.0])
@pytest.mark.parametrize("mel_bins", [80, 128])
def test_whisper_log_mel_is_transformers(seconds: float, mel_bins: int) -> None:
    """Short clips padded to the 30 s window, a full window, and a longer clip cut to it."""
    extractor = WhisperFeatureExtractor(feature_size=mel_bins)
    samples = speech_like(seconds, seed=mel_bins)
    expected = extractor(samples, sampling_rate=RATE, return_tensors="np")["input_features"][0]
    got = audio.whisper_log_mel(samples, config_of(extractor))
    assert got.dtype == np.float32 and got.shape == expected.shape == (mel_bins, 3000)
    assert np.abs(got - expected).max() <= FEATURE_TOLERANCE


def test_whisper_log_mel_longest_padding_is_transformers() -> None:
    """Long-form audio: the whole clip, as the pipeline asks (padding="longest", no truncation)."""
    extractor = WhisperFeatureExtractor()
    samples = speech_like(41.5, seed=3)
    expected = extractor(samples, sampling_rate=RATE, truncation=False, padding="longest", return_tensors="np")
    got = audio.whisper_log_mel(samples, config_of(extractor), length=len(samples))
    assert got.shape == expected["input_features"][0].shape
    assert np.abs(got - expected["input_features"][0]).max() <= FEATURE_TOLERANCE


def test_whisper_log_mel_of_silence_is_transformers() -> None:
    """All zeros: every mel bin at the floor, so the clamp leaves one value everywhere."""
    extractor = WhisperFeatureExtractor()
    samples = np.zeros(RATE, dtype=np.float32)
    expected = extractor(samples, sampling_rate=RATE, return_tensors="np")["input_features"][0]
    assert np.abs(audio.whisper_log_mel(samples, config_of(extractor)) - expected).max() <= FEATURE_TOLERANCE


@pytest.mark.parametrize("seconds", [0.05, 1.0, 7.3, 31.0])
@pytest.mark.parametrize("options", [{}, {"num_mel_bins": 40, "feature_size": 40}, {"do_ceptral_normalize": False}])
def test_kaldi_fbank_is_speech2text(seconds: float, options: dict) -> None:
    """Speech2Text's filter banks, with and without utterance CMVN (transformers' numpy path: this
    environment has no torchaudio, which it would use instead)."""
    extractor = Speech2TextFeatureExtractor(**options)
    samples = speech_like(seconds, seed=6)
    expected = extractor(samples, sampling_rate=RATE, return_tensors="np")["input_features"][0]
    got = audio.kaldi_fbank(samples, config_of(extractor))
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.abs(got - expected).max() <= FEATURE_TOLERANCE


def test_kaldi_fbank_of_silence_and_of_too_little_audio() -> None:
    """Silence leaves every bin constant: transformers divides by a zero deviation (NaN), the
    server leaves the bins centered (zeros). Less than one 25 ms frame is refused."""
    config = config_of(Speech2TextFeatureExtractor())
    silence = audio.kaldi_fbank(np.zeros(RATE, np.float32), config)
    assert silence.shape == (98, 80) and np.abs(silence).max() < 1e-5
    with pytest.raises(InvalidArgument, match="shorter than one 25 ms frame"):
        audio.kaldi_fbank(np.zeros(399, np.float32), config)


def test_kaldi_mel_filter_bank_is_transformers() -> None:
    expected = mel_filter_bank(257, 80, 20, 8000, RATE, None, "kaldi", triangularize_in_mel_space=True)
    np.testing.assert_allclose(audio.mel_filter_bank(257, 80, 20, 8000, RATE, "kaldi"), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seconds", [0.01, 2.0, 11.0])
def test_normalize_is_wav2vec2(seconds: float) -> None:
    extractor = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    samples = speech_like(seconds, seed=5) * 3 + 0.2
    expected = extractor(samples, sampling_rate=RATE, return_tensors="np")["input_values"][0]
    assert np.abs(audio.normalize(samples) - expected).max() <= FEATURE_TOLERANCE


def test_normalize_with_attention_mask_is_wav2vec2() -> None:
    """A padded batch: each row normalized over its own samples, its padding set to padding_value."""
    extractor = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True, padding_value=0.0)
    short, long = speech_like(0.7, seed=1), speech_like(1.9, seed=2) * 2
    expected = extractor([short, long], sampling_rate=RATE, padding=True, return_tensors="np")
    padded = np.zeros(len(long), dtype=np.float32)
    padded[: len(short)] = short
    got = audio.normalize(padded, length=len(short))
    assert expected["attention_mask"][0].sum() == len(short)
    assert np.abs(got - expected["input_values"][0]).max() <= FEATURE_TOLERANCE
    assert np.abs(audio.normalize(long) - expected["input_values"][1]).max() <= FEATURE_TOLERANCE


def test_feature_extractor_config_is_read_from_the_version(tmp_path: Path) -> None:
    WhisperFeatureExtractor(feature_size=128).save_pretrained(tmp_path)
    config = audio.read_feature_extractor(tmp_path)
    assert (config.feature_extractor_type, config.feature_size, config.n_fft, config.hop_length) == (
        "WhisperFeatureExtractor", 128, 400, 160,
    )  # fmt: skip
    assert config.n_samples == 30 * RATE


# ---------------------------------------------------------------------------------------------
# Decoding


@pytest.mark.parametrize(
    ("format", "subtype", "tolerance"),
    # mpg123 does not decode a file to the same last bit twice
    [("WAV", "PCM_16", 0), ("WAV", "FLOAT", 0), ("FLAC", "PCM_16", 0), ("OGG", "VORBIS", 0), ("MP3", None, 1e-6)],
)
def test_files_decode_as_libsndfile_reads_them(format: str, subtype: str | None, tolerance: float) -> None:
    samples = speech_like(1.2)
    data = encoded(samples, RATE, format, subtype)
    expected, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    assert rate == RATE
    got = audio.decode(file_audio(data), 0, RATE, MAX_SECONDS)
    assert got.shape == expected.shape and np.abs(got - expected).max() <= tolerance
    if format in ("WAV", "FLAC"):  # lossless: within 16-bit quantization of the source
        assert np.abs(got - samples).max() <= (1 if subtype == "FLOAT" else 2) / 32768


def test_channels_are_averaged() -> None:
    left, right = speech_like(0.5, seed=1), speech_like(0.5, seed=2)
    stereo = np.stack([left, right], axis=1)
    expected = stereo.mean(axis=1)
    np.testing.assert_allclose(audio.decode(raw_audio(stereo, RATE, 2), 0, RATE, MAX_SECONDS), expected, atol=1e-7)
    wav = encoded(stereo, RATE, "WAV", "FLOAT")
    np.testing.assert_allclose(audio.decode(file_audio(wav), 0, RATE, MAX_SECONDS), expected, atol=1e-7)


def test_raw_samples_at_the_model_rate_are_kept_exactly() -> None:
    samples = speech_like(0.3)
    np.testing.assert_array_equal(audio.decode(raw_audio(samples, RATE), 0, RATE, MAX_SECONDS), samples)
    unset_channels = inference_pb2.Audio(raw=inference_pb2.RawAudio(samples=samples.tobytes(), sample_rate=RATE))
    np.testing.assert_array_equal(audio.decode(unset_channels, 0, RATE, MAX_SECONDS), samples)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000, 96000])
def test_resampling_keeps_a_tone(rate: int) -> None:
    """A 440 Hz tone at `rate`, resampled to 16 kHz, is the same tone sampled at 16 kHz (away from
    the edges, where the filter sees zeros outside the clip)."""
    seconds, frequency = 1.0, 440.0
    tone = lambda r: np.sin(2 * np.pi * frequency * np.arange(int(seconds * r)) / r).astype(np.float32)  # noqa: E731
    got = audio.resample(tone(rate), rate, RATE)
    assert got.dtype == np.float32 and len(got) == RATE
    middle = slice(400, RATE - 400)
    assert np.abs(got[middle] - tone(RATE)[middle]).max() < 1e-3


def torchaudio_resample(samples: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """What the pipelines resample with, torchaudio.functional.resample (not installed here):
    its windowed-sinc kernel (Hann window, 6 zero crossings, rolloff 0.99) as one strided conv1d."""
    gcd = math.gcd(rate, target_rate)
    source, target = rate // gcd, target_rate // gcd
    zero_crossings, base = 6, min(source, target) * 0.99
    width = math.ceil(zero_crossings * source / base)
    offsets = torch.arange(-width, width + source, dtype=torch.float64)[None, None] / source
    t = (torch.arange(0, -target, -1, dtype=torch.float64)[:, None, None] / target + offsets) * base
    t = t.clamp(-zero_crossings, zero_crossings)
    window = torch.cos(t * math.pi / zero_crossings / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), t.sin() / t) * window * (base / source)
    padded = torch.nn.functional.pad(torch.from_numpy(samples)[None, None], (width, width + source))
    resampled = torch.nn.functional.conv1d(padded, kernel.float(), stride=source).transpose(1, 2).reshape(-1)
    return resampled[: math.ceil(target * len(samples) / source)].numpy()


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampling_is_close_to_the_pipelines(rate: int) -> None:
    """soxr against torchaudio's resampler on speech-like audio: same length, and within 1% in the
    band both pass (measured: 0.36% to 0.52%, docs/audio.md); they differ by their filters."""
    samples = speech_like(5.0, seed=4, rate=rate)
    ours, theirs = audio.resample(samples, rate, RATE), torchaudio_resample(samples, rate, RATE)
    assert len(ours) == len(theirs) == 5 * RATE
    frequencies = np.fft.rfftfreq(len(ours), 1 / RATE)
    band = frequencies < min(7200, 0.9 * rate / 2)
    ours_band, theirs_band = np.fft.rfft(ours)[band], np.fft.rfft(theirs)[band]
    assert np.linalg.norm(ours_band - theirs_band) / np.linalg.norm(theirs_band) < 1e-2


# ---------------------------------------------------------------------------------------------
# Bad input


def _truncated_wav() -> bytes:
    data = encoded(speech_like(1.0), RATE, "WAV", "PCM_16")
    return data[: len(data) // 2]


def _truncated_mp3() -> bytes:
    data = encoded(speech_like(1.0), RATE, "MP3")
    return data[: len(data) // 2]


BAD_INPUTS = {
    "empty": (inference_pb2.Audio(), "audio 0 is empty"),
    "not audio": (file_audio(b"\x89PNG\r\n\x1a\n" + bytes(100)), "cannot be decoded: format not recognised"),
    "corrupt flac": (file_audio(encoded(speech_like(1.0), RATE, "FLAC")[:2000]), "cannot be decoded"),
    "truncated wav": (file_audio(_truncated_wav()), "audio 0 is truncated"),
    "truncated mp3": (file_audio(_truncated_mp3()), "audio 0 is truncated"),
    "unsupported format": (file_audio(encoded(speech_like(0.2), RATE, "AIFF")), "an unsupported format"),
    "zero samples": (raw_audio(np.zeros(0, np.float32), RATE), "audio 0 has no samples"),
    "zero frames in a file": (file_audio(encoded(np.zeros(0, np.float32), RATE, "WAV")), "audio 0 has no samples"),
    "nan": (raw_audio(np.array([0.0, np.nan, 0.1], np.float32), RATE), "NaN or infinite sample (frame 1"),
    "infinity": (raw_audio(np.array([0.0, 0.1, -np.inf], np.float32), RATE), "NaN or infinite sample (frame 2"),
    "rate 0": (raw_audio(speech_like(0.1), 0), "a sample rate of 0 Hz is outside 1 to 384000 Hz"),
    "rate too high": (raw_audio(speech_like(0.1), 384001), "a sample rate of 384001 Hz is outside"),
    "ragged raw bytes": (
        inference_pb2.Audio(raw=inference_pb2.RawAudio(samples=bytes(10), sample_rate=RATE)),
        "10 bytes, not a multiple of 4 x channels = 4 x 1 = 4",
    ),
    "ragged stereo frames": (
        inference_pb2.Audio(raw=inference_pb2.RawAudio(samples=bytes(12), sample_rate=RATE, channels=2)),
        "12 bytes, not a multiple of 4 x channels = 4 x 2 = 8",
    ),
    "too long raw": (raw_audio(np.zeros(61 * 8000, np.float32), 8000), "lasts 61.0 s, over the limit of 60 s"),
    "too long file": (
        file_audio(encoded(np.zeros(61 * 8000, np.float32), 8000, "FLAC")),
        "lasts 61.0 s, over the limit of 60 s",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_are_refused_naming_the_problem(case: str) -> None:
    message, expected = BAD_INPUTS[case]
    with pytest.raises(InvalidArgument) as refused:
        audio.decode(message, 0, RATE, MAX_SECONDS)
    assert expected in str(refused.value)


@pytest.mark.parametrize("placeholder", [0xFFFFFFFF, 0x7FFFF000])
def test_a_streamed_wav_with_an_unknown_length_is_read(placeholder: int) -> None:
    """Streaming writers leave the data size at a placeholder (ffmpeg to a pipe 0xFFFFFFFF,
    espeak-ng and sox --stdout 0x7FFFF000): not truncation."""
    data = bytearray(encoded(speech_like(0.5), RATE, "WAV", "PCM_16"))
    position = data.index(b"data") + 4
    data[position : position + 4] = placeholder.to_bytes(4, "little")
    assert len(audio.decode(file_audio(bytes(data)), 0, RATE, MAX_SECONDS)) == RATE // 2
