"""What every speech head shares: decoding an `Audio` message (an encoded file with libsndfile, or
raw float32 samples), downmixing to mono and resampling to the model's rate as the transformers
pipelines prepare audio, and the feature extractors in numpy: Whisper's log-mel spectrogram,
Speech2Text's Kaldi filter banks and wav2vec2's zero-mean unit-variance normalization, with the
numbers transformers' feature extractors compute; and `AudioPipeline`, the batched pipeline of
the heads that run one graph on waveforms (wav2vec2, HuBERT: CTC and classification). The feature
extractor's configuration is the checkpoint's preprocessor_config.json, shipped in the model
version. No torch, no transformers.

Public API: `decode` (an Audio message to mono float32 samples at the model's rate), `resample`,
`downmix`, `FeatureExtractorConfig` and `read_feature_extractor`, `whisper_log_mel`,
`kaldi_fbank` (Speech2Text), `mel_filter_bank`, `normalize`, `run_per_length`, `AudioPipeline`."""

from __future__ import annotations

import functools
import io
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import soxr
from onnxserve.server.errors import InvalidArgument, ModelLoadError
from onnxserve.server.runtime.batching import batchmate_drift, drift_within_limit
from onnxserve.server.tasks.base import BatchedPipeline, ModelResources, Request, RowOutputs

from onnxserve.v1 import inference_pb2

#: The file the feature extractor's configuration ships in, as transformers names it.
FEATURE_EXTRACTOR_FILE = "preprocessor_config.json"
#: libsndfile's names of the encoded formats the contract accepts (WAVEX and RF64 are WAV files
#: with extended headers); other formats libsndfile reads (AIFF, AU, CAF, ...) are refused.
FORMATS = frozenset({"WAV", "WAVEX", "RF64", "FLAC", "OGG", "MP3"})
#: The contract's highest sample rate (RawAudio.sample_rate): 384 kHz, the highest rate of
#: common audio interfaces.
MAX_SAMPLE_RATE = 384_000
#: How long audio may be unless the model's settings say otherwise (ModelSettings.max_audio_seconds).
DEFAULT_MAX_SECONDS = 600.0
#: libsndfile's log line for a WAV data chunk shorter than its header declares.
_SHORT_DATA = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
#: Sizes that streaming writers put in a WAV header whose length they did not know yet: ffmpeg's
#: to a pipe, and espeak-ng's and sox's --stdout (0x7FFFF000).
_UNKNOWN_SIZES = frozenset({0, 0x7FFFF000, 0xFFFFFFFF})
#: Added to the variance before its square root, as Wav2Vec2FeatureExtractor does.
_NORMALIZE_EPSILON = 1e-7
#: Kaldi's fbank: pre-emphasis, and the floor under the mel energies (float32's epsilon).
_PREEMPHASIS = 0.97
_KALDI_MEL_FLOOR = 1.192092955078125e-07
#: Whisper's floor under the mel power before log10, and the dynamic range it keeps (in log10 units).
_LOG_MEL_FLOOR = 1e-10
_LOG_MEL_RANGE = 8.0


def decode(audio: inference_pb2.Audio, index: int, sampling_rate: int, max_seconds: float) -> np.ndarray:
    """The request's audio `index` as mono float32 samples at `sampling_rate` (the model's):
    decoded, averaged over channels, resampled. INVALID_ARGUMENT naming the audio and the
    problem for a corrupt, truncated, unsupported, empty, non-finite or too long audio."""
    samples, rate = read(audio, index, max_seconds)
    return resample(downmix(samples), rate, sampling_rate)


def read(audio: inference_pb2.Audio, index: int, max_seconds: float) -> tuple[np.ndarray, int]:
    """The audio's samples as float32 [frames, channels] and its sample rate, checked."""
    source = audio.WhichOneof("source")
    if source == "raw":
        samples, rate = _from_raw(audio.raw, index)
    elif source is None or not audio.data:
        raise InvalidArgument(f"audio {index} is empty: set its data (an encoded file) or raw (samples)")
    else:
        samples, rate = _from_file(audio.data, index, max_seconds)
    _check_samples(samples, rate, index, max_seconds)
    return samples, rate


def _from_raw(raw: inference_pb2.RawAudio, index: int) -> tuple[np.ndarray, int]:
    channels = raw.channels or 1
    _check_rate(raw.sample_rate, index)
    frame_bytes = 4 * channels
    if len(raw.samples) % frame_bytes:
        raise InvalidArgument(
            f"audio {index}: raw samples hold {len(raw.samples)} bytes, not a multiple of 4 x channels = "
            f"4 x {channels} = {frame_bytes} (float32 little-endian samples, channels interleaved)"
        )
    samples = np.frombuffer(raw.samples, dtype="<f4").astype(np.float32).reshape(-1, channels)
    return samples, raw.sample_rate


def _from_file(data: bytes, index: int, max_seconds: float) -> tuple[np.ndarray, int]:
    """Decodes with libsndfile; the length is checked from the header before decoding, so that a
    small compressed file cannot make the server decode hours of audio."""
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as file:
            if file.format not in FORMATS:
                raise InvalidArgument(
                    f"audio {index} is {file.format_info} audio, an unsupported format: send WAV, FLAC, "
                    "OGG/Vorbis or MP3, or raw samples"
                )
            _check_rate(file.samplerate, index)
            _check_duration(file.frames, file.samplerate, index, max_seconds)
            _check_wav_length(file.extra_info, index)
            declared = file.frames
            samples = file.read(dtype="float32", always_2d=True)
    except soundfile.LibsndfileError as error:
        raise InvalidArgument(
            f"audio {index} ({len(data)} bytes) cannot be decoded: {_reason(error)} "
            "(corrupt or truncated, or not a WAV, FLAC, OGG/Vorbis or MP3 file)"
        ) from None
    if len(samples) < declared:
        raise InvalidArgument(
            f"audio {index} is truncated: its header declares {declared} frames, but only {len(samples)} decode"
        )
    return samples, file.samplerate


def _reason(error: soundfile.LibsndfileError) -> str:
    """libsndfile's message without soundfile's "Error opening <BytesIO ...>:" prefix."""
    text = error.error_string or str(error)
    return text.rstrip(".").lower() if text else "libsndfile error"


def _check_wav_length(log: str, index: int) -> None:
    """libsndfile reads a WAV file cut short as a shorter file, and says so only in its log."""
    match = _SHORT_DATA.search(log)
    if match is not None and int(match.group(1)) not in _UNKNOWN_SIZES:
        raise InvalidArgument(
            f"audio {index} is truncated: its header declares {match.group(1)} bytes of samples, but the file "
            f"holds {match.group(2)}"
        )


def _check_rate(rate: int, index: int) -> None:
    if not 0 < rate <= MAX_SAMPLE_RATE:
        raise InvalidArgument(f"audio {index}: a sample rate of {rate} Hz is outside 1 to {MAX_SAMPLE_RATE} Hz")


def _check_duration(frames: int, rate: int, index: int, max_seconds: float) -> None:
    if frames > max_seconds * rate:
        raise InvalidArgument(
            f"audio {index} lasts {frames / rate:.1f} s, over the limit of {max_seconds:g} s (max_audio_seconds)"
        )


def _check_samples(samples: np.ndarray, rate: int, index: int, max_seconds: float) -> None:
    if samples.size == 0:
        raise InvalidArgument(f"audio {index} has no samples")
    _check_duration(len(samples), rate, index, max_seconds)
    finite = np.isfinite(samples)
    if not finite.all():
        frame = int(np.argmin(finite.all(axis=1)))
        raise InvalidArgument(f"audio {index} has a NaN or infinite sample (frame {frame}, at {frame / rate:.3f} s)")


def downmix(samples: np.ndarray) -> np.ndarray:
    """[frames, channels] to mono: the mean of the channels, as the pipelines average a
    multi-channel input."""
    if samples.shape[1] == 1:
        return samples[:, 0]
    return samples.mean(axis=1, dtype=np.float32)


def resample(samples: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Mono float32 samples from `rate` to `target_rate` with soxr's high-quality band-limited
    resampler (the pipeline resamples with torchaudio's windowed sinc instead: the two differ by
    their filters only, see docs/audio.md)."""
    if rate == target_rate:
        return samples
    return soxr.resample(samples, rate, target_rate, quality="HQ").astype(np.float32, copy=False)


@dataclass(frozen=True)
class FeatureExtractorConfig:
    """The fields of a transformers feature extractor's preprocessor_config.json that the server
    reproduces; defaults are transformers' (WhisperFeatureExtractor's for the spectrogram)."""

    feature_extractor_type: str = ""
    sampling_rate: int = 16000
    feature_size: int = 1  # 1 for raw waveforms (wav2vec2), mel bins for spectrograms
    padding_value: float = 0.0
    do_normalize: bool = False
    return_attention_mask: bool = False
    # Spectrograms (Whisper)
    n_fft: int = 400
    hop_length: int = 160
    chunk_length: int = 30  # seconds of Whisper's window
    # Kaldi filter banks (Speech2Text)
    num_mel_bins: int = 80
    do_ceptral_normalize: bool = True  # transformers' spelling
    normalize_means: bool = True
    normalize_vars: bool = True

    @property
    def n_samples(self) -> int:
        """Samples in Whisper's window."""
        return self.chunk_length * self.sampling_rate

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FeatureExtractorConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


def read_feature_extractor(directory: Path) -> FeatureExtractorConfig:
    """The model version's feature extractor configuration (preprocessor_config.json)."""
    path = directory / FEATURE_EXTRACTOR_FILE
    try:
        config = FeatureExtractorConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as error:
        raise ModelLoadError(f"cannot read the feature extractor configuration {path}: {error}") from error
    return config


def normalize(samples: np.ndarray, length: int | None = None, padding_value: float = 0.0) -> np.ndarray:
    """Wav2Vec2FeatureExtractor's zero-mean unit-variance normalization (do_normalize): the mean
    and variance of the first `length` samples (the attention mask's ones; all by default), and
    the padding after them set to `padding_value`."""
    length = len(samples) if length is None else length
    valid = samples[:length].astype(np.float64)
    normalized = ((samples - valid.mean()) / math.sqrt(valid.var() + _NORMALIZE_EPSILON)).astype(np.float32)
    normalized[length:] = padding_value
    return normalized


def hertz_to_mel(frequencies: np.ndarray, scale: str = "slaney") -> np.ndarray:
    """The Slaney mel scale (librosa's and transformers' "slaney": linear below 1 kHz, logarithmic
    above), or Kaldi's (1127 ln(1 + f / 700))."""
    if scale == "kaldi":
        return 1127.0 * np.log(1.0 + frequencies / 700.0)
    mels = 3.0 * frequencies / 200.0
    log_region = frequencies >= 1000.0
    mels[log_region] = 15.0 + np.log(frequencies[log_region] / 1000.0) * (27.0 / np.log(6.4))
    return mels


def mel_to_hertz(mels: np.ndarray) -> np.ndarray:
    """The inverse of the Slaney scale."""
    frequencies = 200.0 * mels / 3.0
    log_region = mels >= 15.0
    frequencies[log_region] = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mels[log_region] - 15.0))
    return frequencies


def mel_filter_bank(
    frequency_bins: int,
    mel_filters: int,
    min_frequency: float,
    max_frequency: float,
    sampling_rate: int,
    scale: str = "slaney",
) -> np.ndarray:
    """Triangular filters, [frequency_bins, mel_filters], as transformers' mel_filter_bank
    computes them (the configurations do not carry the filters): "slaney", triangles in hertz on
    the Slaney scale with area normalization (norm="slaney", Whisper); "kaldi", triangles in mel
    space on Kaldi's scale, unnormalized (mel_scale="kaldi", triangularize_in_mel_space=True,
    Speech2Text's Kaldi filter banks)."""
    bounds = hertz_to_mel(np.array([float(min_frequency), float(max_frequency)]), scale)
    mel_edges = np.linspace(bounds[0], bounds[1], mel_filters + 2)
    if scale == "kaldi":
        bin_width = sampling_rate / ((frequency_bins - 1) * 2)
        return _triangles(hertz_to_mel(bin_width * np.arange(frequency_bins), scale), mel_edges)
    edges = mel_to_hertz(mel_edges)
    filters = _triangles(np.linspace(0, sampling_rate // 2, frequency_bins), edges)
    return filters * (2.0 / (edges[2:] - edges[:-2]))[None, :]


def _triangles(centers: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Each filter rises from edges[i] to edges[i + 1] and falls to edges[i + 2], at the bins' centers."""
    widths = np.diff(edges)
    slopes = edges[None, :] - centers[:, None]
    return np.maximum(0.0, np.minimum(-slopes[:, :-2] / widths[:-1], slopes[:, 2:] / widths[1:]))


@functools.cache
def _filters(frequency_bins: int, mel_filters: int, low: float, high: float, rate: int, scale: str) -> np.ndarray:
    return mel_filter_bank(frequency_bins, mel_filters, low, high, rate, scale)


def whisper_log_mel(samples: np.ndarray, config: FeatureExtractorConfig, length: int | None = None) -> np.ndarray:
    """WhisperFeatureExtractor's input_features, [feature_size, frames] float32: the samples cut
    or padded (with padding_value) to `length` samples (default: the 30 s window; None: as they
    are, the pipeline's padding="longest" for long-form audio), the power spectrogram of a
    centered STFT (reflect padding, periodic Hann window), the mel filters, log10, clamped to
    8 below the maximum, then (x + 4) / 4; the last frame dropped, as transformers does."""
    target = config.n_samples if length is None else length
    waveform = np.full(max(target, 1), config.padding_value, dtype=np.float32)
    kept = samples[:target]
    if config.do_normalize:
        kept = normalize(kept)
    waveform[: len(kept)] = kept
    power = _power_spectrogram(waveform, config.n_fft, config.hop_length)[:-1]
    mel = power @ _filters(1 + config.n_fft // 2, config.feature_size, 0.0, 8000.0, config.sampling_rate, "slaney")
    log_spec = np.log10(np.maximum(mel, _LOG_MEL_FLOOR))
    log_spec = np.maximum(log_spec, log_spec.max() - _LOG_MEL_RANGE)
    return ((log_spec + 4.0) / 4.0).T.astype(np.float32)


def _power_spectrogram(waveform: np.ndarray, n_fft: int, hop_length: int) -> np.ndarray:
    """|STFT|^2 per frame, [frames, n_fft // 2 + 1], as torch.stft(center=True, pad_mode="reflect")
    with a periodic Hann window computes it."""
    padded = np.pad(waveform.astype(np.float64), n_fft // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop_length]
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)
    spectrum = np.fft.rfft(frames * window, axis=-1)
    return spectrum.real**2 + spectrum.imag**2


def kaldi_fbank(samples: np.ndarray, config: FeatureExtractorConfig) -> np.ndarray:
    """Speech2TextFeatureExtractor's input_features, [frames, num_mel_bins] float32, as its numpy
    path computes Kaldi's fbank: the samples scaled to 16-bit range, 25 ms frames every 10 ms
    (no centering), each frame's DC offset removed, pre-emphasis 0.97, a Povey window, a 512-point
    power spectrum, Kaldi-scale mel filters from 20 Hz to Nyquist, natural log over a floor of
    float32's epsilon; then, with do_ceptral_normalize, each bin's mean and standard deviation
    over the utterance normalized away (utterance CMVN). Audio shorter than one frame is refused."""
    frame_length, hop_length, fft_length = 400, 160, 512
    waveform = samples.astype(np.float64) * 2**15
    if len(waveform) < frame_length:
        raise InvalidArgument(f"audio of {len(samples)} samples is shorter than one 25 ms frame ({frame_length})")
    frames = np.lib.stride_tricks.sliding_window_view(waveform, frame_length)[::hop_length]
    frames = frames - frames.mean(axis=1, keepdims=True)
    frames = np.concatenate([frames[:, :1] * (1 - _PREEMPHASIS), frames[:, 1:] - _PREEMPHASIS * frames[:, :-1]], 1)
    window = np.hanning(frame_length) ** 0.85
    spectrum = np.fft.rfft(frames * window, n=fft_length, axis=-1).astype(np.complex64)  # as transformers keeps it
    power = np.abs(spectrum, dtype=np.float64) ** 2
    bins = config.num_mel_bins
    filters = _filters(fft_length // 2 + 1, bins, 20.0, config.sampling_rate // 2, config.sampling_rate, "kaldi")
    features = np.log(np.maximum(_KALDI_MEL_FLOOR, power @ filters)).astype(np.float32)
    if not config.do_ceptral_normalize:
        return features
    if config.normalize_means:
        features = features - features.mean(axis=0)
    if config.normalize_vars:  # a constant bin (silence) is left as it is where transformers gives NaN
        deviation = features.std(axis=0)
        features = features / np.where(deviation > 0, deviation, 1.0)
    return features.astype(np.float32)


#: Waveform samples the batcher counts as one token: wav2vec2's feature encoder makes one frame
#: of 20 ms (320 samples at 16 kHz), so max_batch_tokens bounds a run's encoder frames (and its
#: attention) as it bounds text tokens.
SAMPLES_PER_TOKEN = 320


@dataclass(frozen=True)
class InputValues:
    """One waveform as the model takes it (input_values), as the batcher carries it: one row of
    len() tokens (SAMPLES_PER_TOKEN samples each). Only waveforms of one length share a run
    (nothing is padded)."""

    values: np.ndarray

    def __len__(self) -> int:
        return -(-len(self.values) // SAMPLES_PER_TOKEN)


def probe_waveforms(sampling_rate: int, count: int = 3, seconds: float = 1.0) -> list[np.ndarray]:
    """Synthetic waveforms of one length (a tone, noise, a chirp), for warm-up and the
    batchmate-drift check."""
    t = np.arange(int(seconds * sampling_rate), dtype=np.float64) / sampling_rate
    rng = np.random.default_rng(16)
    waves = [
        0.5 * np.sin(2 * np.pi * 220 * t),
        0.1 * rng.standard_normal(t.size),
        0.3 * np.sin(2 * np.pi * (100 + 900 * t) * t),
    ]
    return [wave.astype(np.float32) for wave in waves[:count]]


def run_per_length(
    inputs: Sequence[np.ndarray], run: Callable[[np.ndarray], dict[str, np.ndarray]]
) -> list[RowOutputs]:
    """`run` once per length among the inputs, on those of that length stacked (nothing padded),
    and its outputs split back into one row per input, in order."""
    rows: list[RowOutputs] = [{} for _ in inputs]
    for length in sorted({len(values) for values in inputs}):
        members = [i for i, values in enumerate(inputs) if len(values) == length]
        outputs = run(np.stack([inputs[i] for i in members]))
        for position, index in enumerate(members):
            rows[index] = {name: value[position] for name, value in outputs.items()}
    return rows


class AudioPipeline(BatchedPipeline[Request]):
    """A pipeline over one graph that takes waveforms (input_values): audios are decoded,
    resampled and normalized as the checkpoint's Wav2Vec2FeatureExtractor does, on the tokenizing
    executor, and batched like token sequences."""

    def __init__(self, resources: ModelResources) -> None:
        super().__init__(resources)
        if resources.directory is None:
            raise ModelLoadError(f"model {resources.name!r}: its {FEATURE_EXTRACTOR_FILE} is read from its folder")
        self.features = read_feature_extractor(resources.directory)
        self.max_seconds = resources.settings.max_audio_seconds

    @property
    def sampling_rate(self) -> int:
        return self.features.sampling_rate

    def waveforms(self, audios: Sequence[inference_pb2.Audio]) -> list[np.ndarray]:
        """Each audio decoded, mono, at the model's rate."""
        return [decode(audio, index, self.sampling_rate, self.max_seconds) for index, audio in enumerate(audios)]

    def input_values(self, waveform: np.ndarray) -> InputValues:
        """The feature extractor's input_values of one waveform (normalized where it normalizes)."""
        return InputValues(normalize(waveform) if self.features.do_normalize else waveform)

    def forward(self, inputs: Sequence[InputValues]) -> list[RowOutputs]:
        """One graph run per length among the inputs (the graph takes no attention mask, so
        waveforms are never padded)."""
        return run_per_length([item.values for item in inputs], lambda batch: self.session.run({"input_values": batch}))

    def warm_up_inputs(self) -> list[InputValues]:
        return [self.input_values(probe_waveforms(self.sampling_rate, count=1)[0])]

    def merges_safely(self) -> bool:
        """As text encoders (runtime/batching.py merges_safely), measured on probe_waveforms."""
        probes = [self.input_values(wave) for wave in probe_waveforms(self.sampling_rate)]
        return drift_within_limit(self.name, batchmate_drift(self.forward, probes), self.precision, "audios")
