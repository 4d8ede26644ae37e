"""``featurestore.testing.check_encoder``: the encoder contract, runnable by a plugin's author.

Good encoders pass (the built-in ones, and a third-party one defined here through public API only);
each kind of broken encoder fails with a message naming what it broke.
"""
from __future__ import annotations

import pytest
import torch

from featurestore.encoders import AudioSegments, Encoder, register_encoder
from featurestore.testing import EncoderContractError, check_encoder, smoke_input


class ThirdParty(Encoder):
    """A plugin as its author writes it: public API only."""

    modality = "audio"

    def __init__(self, spec, mode: str = "good"):
        super().__init__(spec)
        self.mode = mode
        self.sample_rate, self.segment_seconds = 8000, 0.25
        if mode == "out_of_range":
            self.dtype = "uint8"  # a quantising plugin whose values do not fit: numpy would wrap 300 to 44

    @property
    def output_shape(self):
        return (3,)

    def config(self):
        return {"mode": self.mode}

    def preprocessor(self):
        if self.mode == "unpicklable":
            return lambda raw: torch.as_tensor(raw)
        return AudioSegments(samples=2000, sample_rate=8000)

    def forward(self, batch):
        if self.mode == "in_place":
            batch.mul_(2.0)  # every encoder after it sharing this batch would see the change
        feats = torch.stack([batch.mean(1), batch.std(1), batch.abs().amax(1)], dim=1)
        if self.mode == "batch_dependent":
            feats = feats - feats.mean(0, keepdim=True)  # normalised over the batch
        if self.mode == "random":
            feats = feats + torch.rand_like(feats)
        if self.mode == "wrong_shape":
            feats = feats[:, :2]
        if self.mode == "out_of_range":
            feats = feats * 0 + 300.0
        return feats


@pytest.fixture
def third_party(clean_registry):
    register_encoder("thirdparty")(ThirdParty)
    return "thirdparty"


def test_a_good_plugin_passes(third_party):
    report = check_encoder("thirdparty")
    assert report.ok and {"deterministic", "batch independent", "preprocessor pickles"} <= set(report.checked)


@pytest.mark.parametrize("mode, named", [
    ("batch_dependent", "batch independent"),
    ("random", "deterministic"),
    ("unpicklable", "preprocessor pickles"),
    ("wrong_shape", "encode"),
    ("in_place", "input unchanged"),
    ("out_of_range", "fits storage dtype"),
])
def test_each_broken_plugin_fails_naming_the_broken_promise(third_party, mode, named):
    with pytest.raises(EncoderContractError, match=f"'thirdparty'.*{named}"):
        check_encoder("thirdparty", mode=mode)
    report = check_encoder("thirdparty", raise_on_failure=False, mode=mode)
    assert not report.ok and [f for f in report.failures if f.startswith(named)]


@pytest.mark.parametrize("spec", ["logmel", "frames/32", "timm/test_resnet@none"])
def test_built_in_encoders_pass(spec):
    assert check_encoder(spec).ok


def test_smoke_input_matches_the_modality(third_party):
    audio = smoke_input(ThirdParty("thirdparty"), n=2)
    assert audio.shape == (2, 2000) and audio.dtype.name == "float32"


class WeightedPlugin(Encoder):
    """A plugin with weights, written with the exported helpers only: ``@none[:seed]`` and ``@path``."""

    modality = "audio"

    def __init__(self, spec):
        from featurestore.encoders import announce_random_weights, load_into, parse_weights, read_state_dict, seeded

        super().__init__(spec)
        self.sample_rate, self.segment_seconds = 8000, 0.25
        self.weights = parse_weights(self._spec.weights, None, str(self._spec))
        with seeded(self.weights.seed):
            self.module = torch.nn.Linear(2000, 4)
        if self.weights.kind == "file":
            load_into(self.module, read_state_dict(self.weights.path), self.weights.path)
        elif self.weights.kind == "random":
            announce_random_weights(self.spec)

    @property
    def output_shape(self):
        return (4,)

    def config(self):
        return {}

    def weights_provenance(self):
        return self.weights.provenance()

    def preprocessor(self):
        return AudioSegments(samples=2000, sample_rate=8000)

    def forward(self, batch):
        return self.module(batch)


def test_weight_helpers_are_public_and_enough_for_a_plugin(clean_registry, tmp_path):
    from safetensors.torch import save_file

    from featurestore.encoders import create_encoder, file_sha256

    register_encoder("weighted")(WeightedPlugin)
    a, b, other = (create_encoder(s) for s in ("weighted/m@none:3", "weighted/m@none:3", "weighted/m@none:4"))
    assert torch.equal(a.module.weight, b.module.weight) and not torch.equal(a.module.weight, other.module.weight)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in other.module.state_dict().items()}, str(path))
    loaded = create_encoder(f"weighted/m@{path}")
    assert torch.equal(loaded.module.weight, other.module.weight)
    assert loaded.provenance()["weights"]["sha256"] == file_sha256(path)
    assert check_encoder(loaded).ok and check_encoder("weighted/m@none:3").ok
