"""The torch log-mel encoder against librosa, the paper's reference implementation."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from featurestore.encoders import LogMelEncoder, SpecError, create_encoder, mel_filterbank
from featurestore.encoders.logmel import hz_to_mel, mel_to_hz

librosa = pytest.importorskip("librosa")

TOLERANCE_DB = 0.05


@pytest.fixture(autouse=True, scope="module")
def _librosa_compiled_once(librosa_compiled):
    """librosa's numba compilation, one test process at a time (tests/conftest.py)."""


def librosa_logmel(segment: np.ndarray, **overrides) -> np.ndarray:
    """The paper's transform, exactly as the paper's code would call librosa."""
    params = dict(sr=48000, n_fft=4096, hop_length=512, n_mels=256) | overrides
    return librosa.power_to_db(librosa.feature.melspectrogram(y=segment, **params), ref=1.0)


@pytest.mark.parametrize("sr, n_fft, n_mels, fmin, fmax, norm", [
    (48000, 4096, 256, 0.0, None, "slaney"),
    (22050, 2048, 128, 20.0, 8000.0, "slaney"),
    (16000, 512, 64, 0.0, None, None),
])
def test_mel_filterbank_matches_librosa(sr, n_fft, n_mels, fmin, fmax, norm) -> None:
    ours = mel_filterbank(sr, n_fft, n_mels, fmin, fmax, norm)
    ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, norm=norm, dtype=np.float64)
    assert ours.shape == (n_mels, 1 + n_fft // 2)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)


def test_slaney_mel_scale_matches_librosa_and_inverts() -> None:
    hz = np.array([0.0, 200.0, 999.0, 1000.0, 1001.0, 4000.0, 24000.0])
    np.testing.assert_allclose(hz_to_mel(hz), librosa.hz_to_mel(hz, htk=False), rtol=1e-12)
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(hz)), hz, rtol=1e-12, atol=1e-9)


def test_logmel_matches_librosa_in_db(audio_segments) -> None:
    enc = create_encoder("logmel")
    segments = audio_segments(4)
    ours = enc.encode(enc.preprocessor()(segments)).numpy()
    assert ours.shape == (4, 256, 94) and enc.output_shape == (256, 94)
    for i, segment in enumerate(segments):
        ref = librosa_logmel(segment)
        diff = np.abs(ours[i] - ref).max()
        assert diff < TOLERANCE_DB, f"segment {i}: max |torch - librosa| = {diff:.4f} dB"
    # silence sits at the amin floor (-100 dB), as in librosa
    assert np.all(ours[3] == pytest.approx(-100.0, abs=1e-3))


def test_logmel_with_other_settings_matches_librosa(audio_segments) -> None:
    enc = create_encoder("logmel", sample_rate=16000, n_fft=1024, hop_length=256, n_mels=64, top_db=None)
    segments = audio_segments(2, sample_rate=16000)
    ours = enc.encode(enc.preprocessor()(segments)).numpy()
    assert ours.shape == (2, 64, 1 + 16000 // 256)
    for i, segment in enumerate(segments):
        ref = librosa.power_to_db(librosa.feature.melspectrogram(
            y=segment, sr=16000, n_fft=1024, hop_length=256, n_mels=64), ref=1.0, top_db=None)
        assert np.abs(ours[i] - ref).max() < TOLERANCE_DB


def test_float16_storage_keeps_the_values(audio_segments) -> None:
    enc = create_encoder("logmel")
    ours = enc.encode(enc.preprocessor()(audio_segments(2)))
    stored = ours.numpy().astype(enc.dtype)
    assert enc.dtype == "float16"
    assert np.abs(stored.astype(np.float32) - ours.numpy()).max() < 0.07  # fp16 step at |x| < 128 is 1/16


def test_contract_attributes_and_provenance() -> None:
    enc = create_encoder("logmel")
    assert (enc.spec, enc.name, enc.modality) == ("logmel", "logmel", "audio")
    assert (enc.sample_rate, enc.segment_seconds) == (48000, 1.0)
    prov = enc.provenance()
    assert prov["weights"] == {"kind": "parameter-free"}
    config = prov["config"]
    assert {k: config[k] for k in ("sample_rate", "n_fft", "hop_length", "n_mels", "ref", "amin", "top_db")} == {
        "sample_rate": 48000, "n_fft": 4096, "hop_length": 512, "n_mels": 256, "ref": 1.0, "amin": 1e-10,
        "top_db": 80.0}
    other = create_encoder("logmel", n_mels=128).provenance()
    assert other["config"]["n_mels"] == 128 and other["config"]["output_shape"] == [128, 94]


def test_bad_options_and_inputs_are_rejected() -> None:
    with pytest.raises(SpecError, match="unknown option.*n_mel"):
        create_encoder("logmel", n_mel=128)
    with pytest.raises(SpecError, match="mel_norm"):
        LogMelEncoder("logmel", mel_norm="htk")
    pre = create_encoder("logmel").preprocessor()
    with pytest.raises(ValueError, match=r"expected float audio segments \[n_seg, 48000\].*shape \(2, 44100\)"):
        pre(np.zeros((2, 44100), np.float32))
    with pytest.raises(ValueError, match="expected float audio segments"):
        pre(np.zeros((2, 48000), np.int16))


def test_encode_accepts_batches_on_any_device_and_is_deterministic(audio_segments) -> None:
    enc = create_encoder("logmel", device="auto")
    batch = enc.preprocessor()(audio_segments(3))
    first, second = enc.encode(batch), enc.encode(batch.to(enc.device))
    assert first.device.type == enc.device.type
    assert torch.equal(first, second)


def test_import_stays_light() -> None:
    """librosa (numba JIT), timm and open_clip must not load when the encoders package is imported."""
    code = ("import sys, featurestore.encoders; "
            "print(sorted(m for m in ('librosa', 'numba', 'timm', 'open_clip') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
