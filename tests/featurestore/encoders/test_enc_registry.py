"""The spec grammar, the registry, plugin discovery, and a contract test run for every family."""
from __future__ import annotations

import json
import pickle
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from featurestore.encoders import (
    Encoder,
    EncoderSpec,
    FramePreprocessor,
    SpecError,
    UnknownEncoderError,
    create_encoder,
    get_builder,
    list_encoders,
    parse_spec,
    refresh_plugins,
    register_encoder,
    resolve_device,
)
from featurestore.provenance import canonical_json, fingerprint


# ===================================================================== spec grammar
@pytest.mark.parametrize("text, expected", [
    ("logmel", EncoderSpec("logmel", None, None)),
    ("clip/ViT-B-32", EncoderSpec("clip", "ViT-B-32", None)),
    ("clip/ViT-B-32@none", EncoderSpec("clip", "ViT-B-32", "none")),
    ("timm/regnety_064@ra3_in1k", EncoderSpec("timm", "regnety_064", "ra3_in1k")),
    ("clip/RN101@/ckpt/a@b/rn101.pt", EncoderSpec("clip", "RN101", "/ckpt/a@b/rn101.pt")),
    ("  logmel  ", EncoderSpec("logmel", None, None)),
])
def test_parse_spec(text: str, expected: EncoderSpec) -> None:
    spec = parse_spec(text)
    assert spec == expected
    assert parse_spec(str(spec)) == spec  # canonical text round-trips


def test_spec_name_drops_weights() -> None:
    assert parse_spec("clip/ViT-B-32@openai").name == "clip/ViT-B-32"
    assert parse_spec("logmel").name == "logmel"
    assert str(parse_spec("clip/RN50x4").with_weights("none")) == "clip/RN50x4@none"


@pytest.mark.parametrize("bad", ["", "@none", "clip/", "clip/RN50@", "cl ip/RN50", "/RN50"])
def test_parse_spec_rejects_malformed(bad: str) -> None:
    with pytest.raises(SpecError, match="encoder spec"):
        parse_spec(bad)


# ===================================================================== lookup errors
def test_unknown_family_lists_known_and_nearest() -> None:
    with pytest.raises(UnknownEncoderError) as info:
        create_encoder("clipp/ViT-B-32@none")
    message = str(info.value)
    assert "unknown encoder family 'clipp'" in message
    assert "logmel" in message and "timm" in message
    assert "Did you mean clip" in message


def test_unknown_models_suggest_nearest() -> None:
    with pytest.raises(UnknownEncoderError, match="ViT-B-32"):
        create_encoder("clip/ViT-B-33@none")
    with pytest.raises(UnknownEncoderError, match="regnety_064"):
        create_encoder("timm/regnety_64@none")


def test_model_less_family_rejects_model_and_weights() -> None:
    with pytest.raises(SpecError, match="logmel takes no model"):
        create_encoder("logmel/big")
    with pytest.raises(SpecError, match="logmel takes no model or weights"):
        create_encoder("logmel@none")


def test_family_needing_model_says_so() -> None:
    with pytest.raises(SpecError, match="needs a model"):
        create_encoder("clip@none")


def test_list_encoders_families_and_models() -> None:
    families = list_encoders()
    assert {"logmel", "timm", "clip", "cliptext"} <= set(families)
    assert families == sorted(families)
    clip_models = list_encoders("clip/*", models=True)
    assert {"clip/RN50x4", "clip/RN101", "clip/ViT-B-32"} <= set(clip_models)
    assert list_encoders("timm/regnety_064", models=True) == ["timm/regnety_064"]
    assert list_encoders("logmel", models=True) == ["logmel"]


# ===================================================================== devices
def test_resolve_device() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="not a device"):
        resolve_device("banana")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_auto_picks_cuda_whenever_torch_sees_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The code path a GPU machine takes ("auto" -> cuda), checked here without one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device(" AUTO ") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


# ===================================================================== the worked example (docs/encoders.md)
class FrameStats(Encoder):
    """Per-frame RGB mean and standard deviation: a 6-d colour summary of each frame."""

    modality = "video"
    smoke_spec = "framestats"

    def __init__(self, spec: str | EncoderSpec = "framestats", scale: float = 1.0) -> None:
        super().__init__(spec)
        self.scale = scale

    @classmethod
    def check_spec(cls, spec: EncoderSpec) -> None:
        if spec.model is not None or spec.weights is not None:
            raise SpecError(f"{spec}: framestats takes no model or weights")

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (6,)

    def config(self) -> dict:
        return {"statistics": ["mean", "std"], "scale": self.scale, "preprocess": self.preprocessor().config()}

    def preprocessor(self) -> FramePreprocessor:
        return FramePreprocessor(crop=(32, 32), resize=32, interpolation="bilinear",
                                 mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([batch.mean(dim=(2, 3)), batch.std(dim=(2, 3))], dim=1) * self.scale


class _DropoutStats(FrameStats):
    """FrameStats behind a Dropout module left in training mode, as a careless plugin might build it."""

    def __init__(self, spec: str | EncoderSpec = "framestats") -> None:
        super().__init__(spec)
        self.module = torch.nn.Dropout(p=0.5)  # training mode: would zero half the values at random

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.module(super().forward(batch))


def test_encode_runs_a_plugin_module_in_eval_mode(smooth_frames) -> None:
    enc = _DropoutStats()
    batch = enc.preprocessor()(smooth_frames(4, 40, 60))
    first, second = enc.encode(batch), enc.encode(batch)
    assert not enc.module.training
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(first, FrameStats().encode(batch))


def test_custom_encoder_registered_and_created_by_spec(clean_registry, smooth_frames) -> None:
    register_encoder("framestats")(FrameStats)
    assert "framestats" in list_encoders()
    enc = create_encoder("framestats", device="cpu", scale=2.0)
    assert isinstance(enc, FrameStats) and enc.spec == "framestats" and enc.name == "framestats"
    frames = smooth_frames(3, 40, 60)
    batch = enc.preprocessor()(frames)
    assert batch.shape == (3, 3, 32, 32)
    out = enc.encode(batch)
    expected = np.concatenate([batch.numpy().mean(axis=(2, 3)), batch.numpy().std(axis=(2, 3), ddof=1)], axis=1) * 2
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert enc.provenance()["config"]["scale"] == 2.0
    with pytest.raises(SpecError, match="framestats takes no model"):
        create_encoder("framestats/big")


def test_encode_checks_output_shape(clean_registry) -> None:
    @register_encoder("wrongshape")
    class WrongShape(FrameStats):
        def forward(self, batch: torch.Tensor) -> torch.Tensor:
            return torch.zeros(batch.shape[0], 5)

    enc = create_encoder("wrongshape")
    with pytest.raises(RuntimeError, match=r"returned shape \(2, 5\), expected \(2, 6\)"):
        enc.encode(torch.zeros(2, 3, 32, 32))


def test_registering_twice_warns_and_replaces(clean_registry) -> None:
    register_encoder("twice")(FrameStats)

    class Other(FrameStats):
        pass

    with pytest.warns(RuntimeWarning, match="registered twice"):
        register_encoder("twice")(Other)
    assert get_builder("twice") is Other


def test_builder_must_return_an_encoder(clean_registry) -> None:
    register_encoder("notanencoder")(lambda spec, **kw: object())
    with pytest.raises(TypeError, match="not an Encoder"):
        create_encoder("notanencoder")


def test_register_rejects_bad_family_names() -> None:
    with pytest.raises(ValueError, match="must be letters"):
        register_encoder("a/b")


# ===================================================================== plugins through entry points
PLUGIN_SOURCE = textwrap.dedent('''
    import torch
    from featurestore.encoders import AudioSegments, Encoder

    class Constant(Encoder):
        """Outputs `value` for every segment: the smallest possible audio encoder."""
        modality = "audio"

        def __init__(self, spec, value=3.0):
            super().__init__(spec)
            self.value = float(value)
            self.sample_rate = 16000
            self.segment_seconds = 1.0

        @property
        def output_shape(self):
            return (4,)

        def config(self):
            return {"value": self.value}

        def preprocessor(self):
            return AudioSegments(samples=16000, sample_rate=16000)

        def forward(self, batch):
            return torch.full((batch.shape[0], 4), self.value, device=batch.device)
''')


def _install_fake_dist(root: Path, package: str, entry_points: str) -> None:
    """Write a package and its ``.dist-info`` (what ``pip install`` leaves) under ``root``."""
    (root / package).mkdir()
    (root / package / "__init__.py").write_text(PLUGIN_SOURCE)
    dist = root / f"{package}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[featurestore.encoders]\n{entry_points}\n")


def test_plugin_discovered_through_entry_points(tmp_path, monkeypatch, clean_registry) -> None:
    _install_fake_dist(tmp_path, "fs_demo_plugin", "demo-const = fs_demo_plugin:Constant")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fs_demo_plugin", raising=False)
    refresh_plugins()
    assert "demo-const" in list_encoders()
    assert "fs_demo_plugin" not in sys.modules  # listed without being imported
    enc = create_encoder("demo-const/any-model", value=7.0)
    assert "fs_demo_plugin" in sys.modules
    assert enc.spec == "demo-const/any-model" and enc.modality == "audio"
    out = enc.encode(enc.preprocessor()(np.zeros((2, 16000), np.float32)))
    assert torch.equal(out, torch.full((2, 4), 7.0))
    monkeypatch.delitem(sys.modules, "fs_demo_plugin", raising=False)


def test_broken_plugin_fails_only_when_used(tmp_path, monkeypatch, clean_registry) -> None:
    _install_fake_dist(tmp_path, "fs_broken_plugin", "broken = fs_broken_plugin_missing:Thing")
    monkeypatch.syspath_prepend(str(tmp_path))
    refresh_plugins()
    assert "broken" in list_encoders()
    assert create_encoder("logmel").spec == "logmel"  # other families unaffected
    with pytest.raises(ImportError, match="encoder plugin 'broken'.*failed to load"):
        create_encoder("broken")


# ===================================================================== every registered family
def _smoke_input(enc: Encoder, smooth_frames, audio_segments):
    if enc.modality == "audio":
        return audio_segments(2, int(enc.sample_rate * enc.segment_seconds))
    if enc.modality == "video":
        return smooth_frames(2, 48, 64)
    return ["a photo of a bus.", "a photo of a park."]


@pytest.mark.parametrize("family", list_encoders())
def test_every_family_honours_the_contract(family: str, shared_encoder, smooth_frames, audio_segments) -> None:
    spec = getattr(get_builder(family), "smoke_spec", None)
    if spec is None:
        pytest.skip(f"encoder family {family!r} declares no smoke_spec")
    enc = shared_encoder(spec)
    assert enc.modality in ("audio", "video", "text")
    assert enc.spec.startswith(enc.name) and parse_spec(enc.spec).family == family
    raw = _smoke_input(enc, smooth_frames, audio_segments)
    pre = enc.preprocessor()
    batch = pre(raw)
    again = pickle.loads(pickle.dumps(pre))(raw)  # runs in DataLoader workers: must pickle
    assert torch.equal(batch, again)
    out = enc.encode(batch)
    assert out.shape == (2, *enc.output_shape) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert np.isfinite(out.numpy().astype(enc.dtype)).all()  # fits the storage dtype
    prov = enc.provenance()
    assert prov["encoder"] == enc.spec and set(prov) == {"encoder", "config", "weights"}
    assert json.loads(canonical_json(prov)) == json.loads(json.dumps(prov))  # plain JSON data
    assert len(fingerprint(prov)) == 16
