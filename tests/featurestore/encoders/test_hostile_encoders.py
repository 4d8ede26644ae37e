"""Hostile inputs to the encoders: each test shows a fault that gave wrong features without a word
(or a bare traceback) and now gives the right features or a one-line error."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from featurestore.encoders import Encoder, SpecError, WeightsMismatchError, create_encoder

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")


# ===================================================================== logmel
def _quiet_and_loud(seconds: float = 1.0, sample_rate: int = 48000) -> torch.Tensor:
    """Noise, a tone and a faint hum (-60..-100 dB, where bf16 dB values are coarsest)."""
    rng = np.random.default_rng(3)
    n = int(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    segments = [0.1 * rng.standard_normal(n), np.sin(2 * np.pi * 440 * t),
                1e-3 * np.sin(2 * np.pi * 100 * t) + 1e-4 * rng.standard_normal(n)]
    return torch.from_numpy(np.stack(segments).astype(np.float32))


def test_logmel_in_bf16_runs_on_the_cpu_and_keeps_the_db_values_to_hundredths() -> None:
    """Before: NotImplementedError ("addmm_out_sparse_csr_impl_mkl" not implemented for 'BFloat16')
    from the CPU's sparse filterbank; and on a GPU the bf16 mel power went into log10 as bf16, so
    the dB values themselves were rounded to bf16 (steps of ~0.6 dB near -100 dB)."""
    x = _quiet_and_loud()
    fp32 = create_encoder("logmel").encode(x)
    bf16_encoder = create_encoder("logmel", precision="bfloat16")
    bf16 = bf16_encoder.encode(x)
    config = bf16_encoder.provenance()["config"]
    assert bf16.dtype == torch.float32 and config["run"] == {"precision": "bfloat16"}
    assert config["bf16"] == "filterbank product only, dB in float32"  # not the fingerprint of GPU sets made before
    assert "bf16" not in create_encoder("logmel").provenance()["config"]
    assert not torch.equal(bf16, fp32)  # the filterbank product did run in bf16
    assert (bf16 - fp32).abs().max().item() < 0.05  # dB, as float32 against librosa


def test_logmel_refuses_integer_pcm_instead_of_a_spectrogram_90_db_too_loud() -> None:
    """Before: an int16 batch handed to ``encode`` was taken as floats of +-32768 (+90 dB)."""
    enc = create_encoder("logmel")
    audio = 0.1 * _quiet_and_loud()[:1]
    pcm = (audio * 32767).round().to(torch.int16)
    with pytest.raises(ValueError, match=r"logmel: expected float audio .*torch\.int16.*divide by 32768") as info:
        enc.encode(pcm)
    assert "\n" not in str(info.value)
    torch.testing.assert_close(enc.encode(pcm.float() / 32768), enc.encode(audio), atol=0.2, rtol=0)  # 16-bit grid


# ===================================================================== checkpoints loaded with strict=False
def test_strict_false_with_a_checkpoint_that_fits_nothing_is_refused_not_random_weights(tmp_path) -> None:
    """A Lightning-style checkpoint (keys under ``model.``) with strict=False loaded nothing: the
    features were exactly those of ``@none`` while the provenance said ``file``."""
    torch.manual_seed(11)
    source = timm.create_model("test_resnet", num_classes=0)
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, path)
    with pytest.raises(WeightsMismatchError) as info:
        create_encoder(f"timm/test_resnet@{path}", strict=False)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "extra prefix 'model.'" in message
    assert "none of the" in message and "random weights" in message


def test_strict_false_partial_load_says_how_many_weights_stay_random(tmp_path, capfd) -> None:
    torch.manual_seed(12)
    state = timm.create_model("test_resnet", num_classes=0).state_dict()
    del state["conv1.0.weight"], state["conv1.1.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    create_encoder(f"timm/test_resnet@{path}", strict=False)
    err = capfd.readouterr().err
    assert f"checkpoint {path.resolve()} (strict=False) lacks 2 of the" in err and "conv1.0.weight" in err


def test_strict_false_whole_clip_checkpoint_without_an_image_tower_is_refused(tiny_clip, tmp_path,
                                                                            smooth_frames) -> None:
    """A text-tower checkpoint given to the image encoder with strict=False loaded the text tower
    and left the image tower it runs random, silently."""
    torch.manual_seed(13)
    source = open_clip.create_model(tiny_clip, pretrained=None)
    path = tmp_path / "text_only.pt"
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith("visual.")}, path)
    with pytest.raises(WeightsMismatchError, match="none of the .* weights the encoder runs"):
        create_encoder(f"clip/{tiny_clip}@{path}", strict=False)
    text = create_encoder(f"cliptext/{tiny_clip}@{path}", strict=False)  # the text tower is all there
    prompts = ["a photo of a bus."]
    with torch.no_grad():
        expected = source.eval().encode_text(open_clip.get_tokenizer(tiny_clip)(prompts))
    torch.testing.assert_close(text.encode_text(prompts), expected)


# ===================================================================== class prompts of the text tower
def test_class_names_cut_by_the_context_length_are_refused_not_merged(tiny_clip) -> None:
    """The tokenizer cuts prompts at 77 tokens: two long class names that differ past the cut got
    one and the same text embedding, so a zero-shot head could never tell them apart."""
    enc = create_encoder(f"cliptext/{tiny_clip}@none")
    stem = "_".join(["very"] * 80)
    classes = [f"{stem}_airport", f"{stem}_park"]
    with pytest.raises(ValueError, match=r"prompt of class .* is 8\d tokens, more than the text tower's "
                                         r"context of 77") as info:
        enc.class_prompts(classes)
    assert "\n" not in str(info.value)


def test_a_long_template_that_pushes_the_names_out_is_refused(tiny_clip) -> None:
    template = "a photo taken " + " ".join(["somewhere"] * 80) + " of a {}."
    enc = create_encoder(f"cliptext/{tiny_clip}@none", template=template)
    with pytest.raises(ValueError, match="shorten the class name or the template"):
        enc.class_prompts(["airport", "park"])


def test_classes_whose_prompts_tokenize_alike_are_refused(tiny_clip) -> None:
    """``street_traffic`` and ``Street traffic`` (the tokenizer lowercases) were one embedding."""
    enc = create_encoder(f"cliptext/{tiny_clip}@none")
    with pytest.raises(ValueError, match=r"classes 'street_traffic' and 'Street traffic' give the same prompt "
                                         r"tokens"):
        enc.class_prompts(["street_traffic", "park", "Street traffic"])
    with pytest.raises(ValueError, match="class name '_' is empty"):
        enc.class_prompts(["park", "_"])
    assert enc.class_prompts(["street_traffic", "park"]) == ["a photo of a street traffic.", "a photo of a park."]


def test_a_template_with_another_field_is_refused_when_built_not_mid_extraction(tiny_clip) -> None:
    """Before: ``"a {} in {city}"`` built fine and ``class_prompts`` raised a bare KeyError."""
    with pytest.raises(SpecError, match=r"template 'a \{\} in \{city\}' is not a format string .*KeyError") as info:
        create_encoder(f"cliptext/{tiny_clip}@none", template="a {} in {city}")
    assert "\n" not in str(info.value)
    with pytest.raises(SpecError, match="exactly one"):
        create_encoder(f"cliptext/{tiny_clip}@none", template="{0} or {0}")
    braces = create_encoder(f"cliptext/{tiny_clip}@none", template="a {{scene}}: {}")  # literal braces are fine
    assert braces.class_prompts(["park"]) == ["a {scene}: park"]


# ===================================================================== eval mode, all the way down
class _HeadAddedAfterEval(Encoder):
    """A plugin that swaps in a new head after ``eval()``: the new head starts in training mode."""

    modality = "video"

    def __init__(self) -> None:
        super().__init__("hostile_head")
        with torch.random.fork_rng():
            torch.manual_seed(0)
            body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16))
        self.module = torch.nn.Sequential(body, torch.nn.Identity()).eval()
        self.module[1] = torch.nn.Sequential(torch.nn.BatchNorm1d(16), torch.nn.Dropout(0.5))

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (16,)

    def config(self) -> dict[str, Any]:
        return {}

    def preprocessor(self) -> Any:
        return None

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.module(batch)


def test_a_submodule_in_training_mode_is_put_in_eval_mode_before_encoding() -> None:
    """Only the top module's flag was checked: the head's dropout and batch statistics stayed on,
    so a clip's features changed from call to call and with the other clips of its batch."""
    enc = _HeadAddedAfterEval()
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    first = enc.encode(x)
    assert torch.equal(enc.encode(x), first)
    torch.testing.assert_close(enc.encode(x[1:2]), first[1:2])  # alone or in a batch: the same
    assert not any(m.training for m in enc.module.modules())


# ===================================================================== logmel settings that make no bands
@pytest.mark.parametrize("options", [dict(fmin=30000.0), dict(fmin=5000.0, fmax=2000.0), dict(fmax=40000.0),
                                     dict(fmin=-100.0)])
def test_logmel_band_limits_outside_the_spectrum_are_refused(options) -> None:
    """Before: fmin above fmax or above the Nyquist rate built fine and gave every band of every
    segment a constant -100 dB; fmax above it, or a negative fmin, left some bands constant."""
    with pytest.raises(SpecError, match=r"0 <= fmin < fmax <= sample_rate / 2 = 24000 Hz") as info:
        create_encoder("logmel", **options)
    assert "\n" not in str(info.value)


def test_logmel_with_more_bands_than_the_fft_resolves_warns_as_librosa_does() -> None:
    """n_mels=256 on a 512-point FFT at 48 kHz leaves 67 bands without an FFT bin (constant)."""
    with pytest.warns(UserWarning, match=r"67 of the 256 mel bands are empty .*lower n_mels or raise n_fft"):
        enc = create_encoder("logmel", n_fft=512, hop_length=128)
    out = enc.encode(_quiet_and_loud()[:1])[0]
    assert int((out.amax(dim=1) == out.amin(dim=1)).sum()) == 67


# ===================================================================== devices
@pytest.mark.parametrize("device", ["mps", "xpu", "meta"])
def test_a_device_type_this_machine_lacks_is_one_value_error(device) -> None:
    """Before: 'mps' raised a RuntimeError and 'xpu' an AssertionError from inside torch (tracebacks
    on the command line), and 'meta' built an encoder whose weights and features hold no values."""
    if device != "meta" and getattr(torch, device).is_available():
        pytest.skip(f"this machine has {device}")
    with pytest.raises(ValueError, match=rf"device '{device}' was requested but {device.upper()} is not available "
                                         r"here; use 'cpu' or 'auto'"):
        create_encoder("logmel", device=device)


def test_a_cuda_index_past_the_last_gpu_is_refused(monkeypatch) -> None:
    """Before: 'cuda:3' on a one-GPU machine passed and failed later inside torch ("invalid device
    ordinal"), as a traceback."""
    from featurestore.encoders import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match=r"device 'cuda:3' was requested but this machine has 1 CUDA device\(s\)"):
        resolve_device("cuda:3")


# ===================================================================== raw pixels handed to an image model
@pytest.mark.parametrize("spec", ["timm/test_resnet@none", "clip/{tiny}@none"])
def test_uint8_pixels_handed_to_encode_are_refused_not_embedded(spec, tiny_clip, smooth_frames) -> None:
    """Stored ``frames/<size>`` pixels are uint8 [K, 3, S, S], the layout a model takes: ``encode``
    took them as normalised input (``float()`` of 0..255), features of nothing the model was
    trained on, without a word."""
    enc = create_encoder(spec.format(tiny=tiny_clip))
    frames = smooth_frames(2, 48, 64)
    size = enc.preprocessor().crop
    pixels = create_encoder(f"frames/{size[0]}").preprocessor()(frames)  # as the frames feature set stores them
    assert pixels.dtype == torch.uint8 and pixels.shape == (2, 3, *size)
    with pytest.raises(ValueError, match=r"encode\(\) takes the preprocessor's normalised float frames .*torch\.uint8.*"
                                         r"through encoder\.preprocessor\(\) first") as info:
        enc.encode(pixels)
    assert "\n" not in str(info.value) and enc.spec in str(info.value)
    assert enc.encode(enc.preprocessor()(frames)).shape == (2, *enc.output_shape)


@pytest.mark.parametrize("sample_rate, seconds, samples", [(48000, 1.1, 52800), (22050, 0.7, 15435)])
def test_logmel_segments_whole_up_to_float_rounding_are_accepted_as_decoding_cuts_them(sample_rate, seconds, samples,
                                                                                       tmp_path) -> None:
    """48000 * 1.1 is 52800.00000000001 in floats: refused as "not a whole number of samples",
    while decoding cuts such segments at round(seconds * rate) samples."""
    import soundfile

    from featurestore.decode.audio import load_audio_segments

    path = tmp_path / "clip.wav"
    rng = np.random.default_rng(0)
    soundfile.write(str(path), 0.1 * rng.standard_normal(3 * samples), sample_rate, subtype="PCM_24")
    segments = load_audio_segments(path, sample_rate, n_segments=3, segment_seconds=seconds)
    assert segments.shape == (3, samples)
    enc = create_encoder("logmel", sample_rate=sample_rate, segment_seconds=seconds, n_fft=1024, hop_length=256,
                         n_mels=64)
    assert enc.params.samples == samples and enc.output_shape == (64, 1 + samples // 256)
    assert enc.encode(enc.preprocessor()(segments)).shape == (3, *enc.output_shape)
    with pytest.raises(SpecError, match="whole number of samples"):
        create_encoder("logmel", sample_rate=44100, segment_seconds=0.10001)


@pytest.mark.parametrize("spec", ["timm/test_resnet@none", "frames/32"])
@pytest.mark.parametrize("shape", [(2, 0, 5, 3), (2, 5, 0, 3)])
def test_frames_without_pixels_are_one_value_error(spec, shape) -> None:
    """Before: a ZeroDivisionError (resize of a 0-pixel side) or torch's RuntimeError from inside
    the interpolation, neither saying which input was wrong."""
    pre = create_encoder(spec).preprocessor()
    with pytest.raises(ValueError, match=rf"expected uint8 RGB frames \[K, H, W, 3\], got uint8 array of shape "
                                         rf"\({shape[0]}, {shape[1]}, {shape[2]}, 3\)"):
        pre(np.zeros(shape, np.uint8))
