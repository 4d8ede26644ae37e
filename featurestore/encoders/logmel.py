"""``logmel``: log-mel spectrograms of 1 s audio segments, computed with torch on the device.

The paper computed them with librosa (``melspectrogram`` + ``power_to_db``) at sr 48000, n_fft 4096,
hop 512, n_mels 256. This encoder reproduces that numerically (tests compare against librosa in dB)
but runs batched in torch, so extraction on a GPU needs no CPU-side spectrograms, and it never
imports librosa, whose first call costs seconds of numba compilation.

Defaults are librosa's: periodic Hann window, ``center=True`` with zero padding, power 2, Slaney mel
scale with Slaney ("area") normalisation, fmin 0, fmax sr/2; ``power_to_db`` with ``ref=1.0``,
``amin=1e-10``, ``top_db=80`` (the floor is applied per segment, as each segment is its own librosa
call). One 1 s segment gives ``[256, 94]`` (94 = 1 + 48000 // 512 frames).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from featurestore.encoders._encoder import Encoder
from featurestore.encoders._names import EncoderSpec, SpecError
from featurestore.encoders._preprocess import AudioSegments
from featurestore.encoders._registry import register_encoder


@dataclass(frozen=True)
class LogMelConfig:
    """Parameters of the log-mel transform; every field changes the output and is in provenance."""

    sample_rate: int = 48000        # input rate in Hz; decode resamples audio to it
    segment_seconds: float = 1.0    # length of one segment (the paper trains on 1 s segments)
    n_fft: int = 4096               # FFT size = window length
    hop_length: int = 512           # samples between frames
    n_mels: int = 256               # mel bands
    fmin: float = 0.0               # lowest band edge (Hz)
    fmax: float | None = None       # highest band edge (Hz); None = sample_rate / 2
    power: float = 2.0              # exponent of the magnitude (2 = power spectrogram)
    mel_norm: str | None = "slaney"  # filter normalisation: "slaney" (area) or None (peak 1)
    ref: float = 1.0                # power_to_db reference
    amin: float = 1e-10             # power_to_db floor before the log
    top_db: float | None = 80.0     # dynamic range kept below each segment's maximum; None = all

    def __post_init__(self) -> None:
        samples = self.sample_rate * self.segment_seconds
        # whole up to float rounding (48000 * 1.1 is 52800.00000000001), as decoding rounds it
        if abs(samples - round(samples)) > 1e-9 * max(1.0, abs(samples)) or round(samples) < self.n_fft // 2 + 1:
            raise SpecError(f"logmel: segment of {self.segment_seconds} s at {self.sample_rate} Hz must be a "
                            f"whole number of samples longer than n_fft/2 ({self.n_fft // 2})")
        if self.mel_norm not in ("slaney", None):
            raise SpecError(f"logmel: mel_norm must be 'slaney' or None, got {self.mel_norm!r}")
        if self.n_mels < 1 or self.hop_length < 1 or self.amin <= 0 or self.ref <= 0:
            raise SpecError(f"logmel: n_mels and hop_length must be >= 1 and amin, ref > 0 (got {self})")
        nyquist = self.sample_rate / 2
        fmax = nyquist if self.fmax is None else self.fmax
        if not 0 <= self.fmin < fmax <= nyquist:
            # outside, the filters are empty: every band of every segment a constant -100 dB
            raise SpecError(f"logmel: the mel bands must lie in 0 <= fmin < fmax <= sample_rate / 2 = {nyquist:g} Hz, "
                            f"got fmin={self.fmin:g}, fmax={fmax:g}")

    @property
    def samples(self) -> int:
        """Samples per segment (rounded as ``featurestore.decode.audio`` rounds the segment length)."""
        return int(round(self.sample_rate * self.segment_seconds))

    @property
    def n_frames(self) -> int:
        """STFT frames per segment with centred (padded) frames."""
        return 1 + self.samples // self.hop_length


# ===================================================================== the mel filterbank
_F_SP = 200.0 / 3.0                   # Slaney scale: Hz per mel below 1 kHz
_MIN_LOG_HZ = 1000.0                  # where the scale turns logarithmic
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP    # = 15 mel
_LOGSTEP = math.log(6.4) / 27.0       # log step above 1 kHz


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's (Auditory Toolbox) mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / _F_SP
    log = _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(hz >= _MIN_LOG_HZ, log, linear)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    """Inverse of ``hz_to_mel``."""
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * _F_SP
    log = _MIN_LOG_HZ * np.exp(_LOGSTEP * (np.maximum(mel, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(mel >= _MIN_LOG_MEL, log, linear)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None,
                   norm: str | None = "slaney") -> np.ndarray:
    """Triangular mel filters ``[n_mels, 1 + n_fft // 2]`` (float64), as ``librosa.filters.mel``'s default.

    Band edges are ``n_mels + 2`` points equally spaced on the Slaney mel scale between fmin and fmax;
    filter i rises from edge i to edge i+1 and falls to edge i+2, evaluated at the FFT bin centre
    frequencies. With ``norm="slaney"`` each filter is divided by its width in Hz / 2, so every
    band has the same area (constant energy per band for white noise).
    """
    fmax = sample_rate / 2.0 if fmax is None else float(fmax)
    bin_hz = np.linspace(0.0, sample_rate / 2.0, 1 + n_fft // 2)
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    widths = np.diff(edges_hz)
    offsets = edges_hz[:, None] - bin_hz[None, :]
    rising = -offsets[:-2] / widths[:-1, None]
    falling = offsets[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    if norm == "slaney":
        weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    return weights


def _warn_empty_bands(mel: np.ndarray, config: LogMelConfig) -> None:
    """Warn, as librosa does, when some mel filters fall between FFT bins and so hold no weight:
    those bands are a constant (the amin floor) in every segment."""
    empty = int((mel.max(axis=1) <= 0).sum())
    if empty:
        warnings.warn(f"logmel: {empty} of the {config.n_mels} mel bands are empty (narrower than the FFT bins of "
                      f"n_fft={config.n_fft} at {config.sample_rate} Hz) and will be constant; lower n_mels or "
                      f"raise n_fft", UserWarning, stacklevel=3)


# ===================================================================== the torch transform
class LogMelSpectrogram(torch.nn.Module):
    """``[B, samples]`` waveforms -> ``[B, n_mels, frames]`` log-mel in dB (float32)."""

    def __init__(self, config: LogMelConfig) -> None:
        super().__init__()
        self.config = config
        mel = mel_filterbank(config.sample_rate, config.n_fft, config.n_mels, config.fmin, config.fmax,
                             config.mel_norm)
        _warn_empty_bands(mel, config)
        self.register_buffer("mel", torch.from_numpy(mel.astype(np.float32)), persistent=False)
        self.register_buffer("window", torch.hann_window(config.n_fft, periodic=True), persistent=False)
        self._mel_csr: torch.Tensor | None = None  # CPU only, built on first CPU forward

    def _apply_mel(self, spec: torch.Tensor) -> torch.Tensor:
        """``[B, F, T]`` power -> ``[B, n_mels, T]``.

        On the CPU the filterbank is applied as a sparse CSR matrix: every FFT bin lies under at
        most two triangles, so the dense product does ~100x more multiply-adds than needed and
        costs more than the STFT itself. On GPUs the dense matmul is already cheap.
        """
        if spec.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            # GPUs; and bf16 autocast on the CPU, which has no bf16 sparse kernel (and which the
            # dense product honours, as on a GPU)
            return torch.matmul(self.mel, spec)
        if self._mel_csr is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
                self._mel_csr = self.mel.cpu().to_sparse_csr()
        batch, bins, frames = spec.shape
        flat = spec.transpose(0, 1).reshape(bins, batch * frames)
        return (self._mel_csr @ flat).reshape(-1, batch, frames).transpose(0, 1)

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        stft = torch.stft(waveforms.float(), n_fft=cfg.n_fft, hop_length=cfg.hop_length, window=self.window,
                          center=True, pad_mode="constant", return_complex=True)
        if cfg.power == 2.0:
            spec = stft.real.square() + stft.imag.square()
        else:
            spec = stft.abs().pow(cfg.power)
        # float32 from here on: under bf16 autocast the product comes back in bf16, whose 8-bit
        # mantissa would quantise the dB values themselves (0.6 dB steps near -100 dB); rounding the
        # power instead costs only ~0.02 dB
        mel = self._apply_mel(spec).float()
        db = 10.0 * torch.log10(mel.clamp_min(cfg.amin)) - 10.0 * math.log10(max(cfg.amin, cfg.ref))
        if cfg.top_db is not None:
            floor = db.amax(dim=(-2, -1), keepdim=True) - cfg.top_db
            db = torch.maximum(db, floor)
        return db


@register_encoder("logmel")
class LogMelEncoder(Encoder):
    """Log-mel spectrogram of each audio segment; paper defaults, other settings as options.

    ``create_encoder("logmel", n_mels=128)`` changes a parameter; all parameters are recorded in
    the provenance config, so feature sets made with other settings get other fingerprints.
    """

    modality = "audio"
    smoke_spec = "logmel"

    def __init__(self, spec: str | EncoderSpec = "logmel", **params: Any) -> None:
        super().__init__(spec)
        valid = {f.name for f in fields(LogMelConfig)}
        unknown = sorted(set(params) - valid)
        if unknown:
            raise SpecError(f"logmel: unknown option(s) {unknown}; valid: {sorted(valid)}")
        self.params = LogMelConfig(**params)
        self.module = LogMelSpectrogram(self.params)
        self.sample_rate = self.params.sample_rate
        self.segment_seconds = self.params.segment_seconds

    @classmethod
    def check_spec(cls, spec: EncoderSpec) -> None:
        """``logmel`` has neither a model nor weights."""
        if spec.model is not None or spec.weights is not None:
            raise SpecError(f"encoder spec {str(spec)!r}: logmel takes no model or weights; use 'logmel' "
                            f"(and options such as n_mels=128 for other settings)")

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (self.params.n_mels, self.params.n_frames)

    def config(self) -> dict[str, Any]:
        config = {"transform": "log-mel (librosa melspectrogram + power_to_db equivalent)", "window": "hann",
                  "center": True, "pad_mode": "constant", "mel_scale": "slaney", **asdict(self.params)}
        if self.precision == "bfloat16":
            # bf16 feature sets made before the dB values were taken in float32 (rounded to bf16,
            # ~0.3 dB off) must not be resumed with these: another fingerprint
            config["bf16"] = "filterbank product only, dB in float32"
        return config

    def preprocessor(self) -> AudioSegments:
        return AudioSegments(samples=self.params.samples, sample_rate=self.params.sample_rate)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if not batch.is_floating_point():  # int16 PCM as floats is 90 dB too loud, silently
            raise ValueError(f"{self.spec}: expected float audio (full scale 1.0), got a {batch.dtype} batch; "
                             f"scale integer PCM first (int16: divide by 32768), as librosa requires")
        if batch.ndim != 2 or batch.shape[1] != self.params.samples:
            raise ValueError(f"{self.spec}: expected a batch of segments [B, {self.params.samples}], "
                             f"got {tuple(batch.shape)}")
        return self.module(batch)
