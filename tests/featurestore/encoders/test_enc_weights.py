"""The ``@weights`` grammar, checkpoint reading and the offline switch, without any model zoo."""
from __future__ import annotations

import hashlib
import os

import pytest
import torch

from featurestore.encoders import SpecError, WeightsMismatchError, WeightsNotFoundError, parse_weights, read_state_dict
from featurestore.encoders._weights import hub_offline, load_into, seeded


def test_parse_weights_kinds(tmp_path) -> None:
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"not really a checkpoint")
    assert parse_weights(None, "openai", "clip/RN101").provenance() == {"kind": "pretrained", "tag": "openai"}
    assert parse_weights("laion2b", "openai", "clip/RN101").tag == "laion2b"
    random = parse_weights("none", "openai", "clip/RN101")
    assert (random.provenance(), random.spec_text) == ({"kind": "random", "seed": 0}, "none")
    seeded7 = parse_weights("none:7", "openai", "clip/RN101")
    assert (seeded7.provenance(), seeded7.spec_text) == ({"kind": "random", "seed": 7}, "none:7")
    file = parse_weights(str(ckpt), "openai", "clip/RN101")
    assert file.provenance() == {"kind": "file", "path": str(ckpt.resolve()),
                                 "sha256": hashlib.sha256(b"not really a checkpoint").hexdigest()}
    assert file.spec_text == str(ckpt.resolve())


def test_parse_weights_errors(tmp_path) -> None:
    with pytest.raises(SpecError, match="no default pretrained weights"):
        parse_weights(None, None, "clip/tiny")
    with pytest.raises(SpecError, match="integer seed"):
        parse_weights("none:abc", "openai", "clip/RN101")
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        parse_weights(str(tmp_path / "nope.safetensors"), "openai", "clip/RN101")
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        parse_weights("relative-name.pth", "openai", "clip/RN101")  # a suffix makes it a path


def test_model_key_nesting_and_load_errors(tmp_path) -> None:
    module = torch.nn.Linear(3, 2)
    path = tmp_path / "nested.pth"
    torch.save({"model": module.state_dict(), "optimizer": {"lr": 0.1}}, path)
    state = read_state_dict(path)
    target = torch.nn.Linear(3, 2)
    load_into(target, state, path)
    assert torch.equal(target.weight, module.weight)
    with pytest.raises(WeightsMismatchError, match="nested.pth does not fit Linear.*1 keys with another shape"):
        load_into(torch.nn.Linear(4, 2), state, path)
    with pytest.raises(WeightsMismatchError, match="could not be read"):
        bad = tmp_path / "bad.pt"
        bad.write_bytes(b"garbage")
        read_state_dict(bad)


def test_seeded_construction_restores_the_callers_rng() -> None:
    torch.manual_seed(99)
    expected_next = torch.rand(1)
    torch.manual_seed(99)
    with seeded(0):
        first = torch.nn.Linear(4, 4).weight.detach().clone()
    assert torch.equal(torch.rand(1), expected_next)
    with seeded(0):
        second = torch.nn.Linear(4, 4).weight.detach().clone()
    assert torch.equal(first, second)


def test_hub_offline_is_scoped(monkeypatch) -> None:
    import huggingface_hub.constants as constants

    monkeypatch.delenv("FEATURESTORE_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with hub_offline():
        assert constants.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"
    assert constants.HF_HUB_OFFLINE is False and "HF_HUB_OFFLINE" not in os.environ
    monkeypatch.setenv("FEATURESTORE_ALLOW_DOWNLOAD", "1")
    with hub_offline():
        assert constants.HF_HUB_OFFLINE is False
