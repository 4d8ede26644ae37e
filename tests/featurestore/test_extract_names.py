"""Chosen feature-set names (``NAME=SPEC``): two weight choices of one encoder side by side in one
store, each resumable and refused on its own; and encoder options from the command line
(``--encoder-option SPEC_OR_NAME.key=value``) reaching the encoder and its fingerprint."""
from __future__ import annotations

import json

import numpy as np
import pytest
from tests.featurestore.test_extract_support import FAST, assert_same_arrays, clip_id, make_dataset, read_all

from featurestore.cli import main
from featurestore.encoders import SpecError, create_encoder
from featurestore.errors import FingerprintMismatchError
from featurestore.extract import encoder_options_argument, extract
from featurestore.store import open_store

TWO = "timm/test_vit@none,vit_seed1=timm/test_vit@none:1"
CLI = ["--device", "cpu", "--num-workers", "0", "--chunk-clips", "2", "--batch-size", "2", "-q"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("names") / "data", 4, seconds=2.0, frames=2)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_two_weight_choices_of_one_encoder_side_by_side_each_resumable(dataset, tmp_path):
    whole = tmp_path / "whole.zarr"
    assert extract(dataset, whole, TWO, **FAST).exit_code == 0
    with open_store(whole) as store:
        sets = store.feature_sets()
        assert sorted(sets) == ["timm/test_vit", "vit_seed1"]
        assert sets["timm/test_vit"].provenance["encoder"] == "timm/test_vit@none"
        assert sets["vit_seed1"].provenance["encoder"] == "timm/test_vit@none:1"
        assert sets["timm/test_vit"].fingerprint != sets["vit_seed1"].fingerprint
        a, b = store.get_many("timm/test_vit", store.clip_ids), store.get_many("vit_seed1", store.clip_ids)
        assert a.shape == b.shape and np.abs(a.astype(np.float32) - b.astype(np.float32)).mean() > 0.01

    resumed = tmp_path / "resumed.zarr"  # half, then the rest; the mapping form asks for the same
    first = extract(dataset, resumed, TWO, limit=2, **FAST)
    assert first.features["vit_seed1"].written == 2
    rest = extract(dataset, resumed, {"timm/test_vit": "timm/test_vit@none", "vit_seed1": "timm/test_vit@none:1"},
                   **FAST)
    assert {n: (f.written, f.skipped) for n, f in rest.features.items()} == {"timm/test_vit": (2, 2),
                                                                              "vit_seed1": (2, 2)}
    assert_same_arrays(read_all(resumed), read_all(whole))

    with pytest.raises(FingerprintMismatchError, match="(?s)'vit_seed1'.*weights.seed: existing 1, requested 2"):
        extract(dataset, resumed, "vit_seed1=timm/test_vit@none:2", **FAST)
    with pytest.raises(ValueError, match=r"\['timm/test_vit'\] requested twice.*NAME=SPEC"):
        extract(dataset, resumed, "timm/test_vit@none,timm/test_vit@none:1", **FAST)


def test_ls_show_get_use_the_chosen_name(dataset, tmp_path, capsys):
    store = tmp_path / "s.zarr"
    assert run(capsys, "extract", str(dataset.root), "--store", str(store), "--encoders", TWO, "--segments", "2",
               "--frames", "2", *CLI)[0] == 0
    code, out, _ = run(capsys, "ls", "--store", str(store), "--json")
    features = json.loads(out)["features"]
    assert code == 0 and features["vit_seed1"]["encoder"] == "timm/test_vit@none:1"
    assert features["vit_seed1"]["weights"] == "RANDOM(seed=1)" and features["vit_seed1"]["n_done"] == 4
    code, out, _ = run(capsys, "show", "--store", str(store), clip_id(1), "--json")
    assert code == 0 and json.loads(out)["features"]["vit_seed1"]["status"] == "done"
    npy = tmp_path / "x.npy"
    assert run(capsys, "get", "--store", str(store), clip_id(1), "vit_seed1", "-o", str(npy))[0] == 0
    with open_store(store) as fs:
        np.testing.assert_array_equal(np.load(npy), fs.get("vit_seed1", clip_id(1)))


def test_create_encoder_takes_name_equals_spec():
    encoder = create_encoder("vit_random=timm/test_vit@none")
    assert (encoder.name, encoder.spec) == ("vit_random", "timm/test_vit@none")
    assert encoder.request == {"spec": "timm/test_vit@none", "options": {}}
    for bad, message in (("=timm/test_vit@none", "both parts"), ("a b=logmel", "invalid feature set name"),
                         ("vit=timm", "needs a model")):
        with pytest.raises(SpecError, match=message):
            create_encoder(bad)


def test_encoder_options_from_the_command_line_reach_the_encoder_and_its_fingerprint(dataset, tmp_path, capsys):
    store = tmp_path / "s.zarr"
    base = ["extract", str(dataset.root), str(store), "--encoders", "logmel", "--segments", "2", *CLI]
    assert run(capsys, *base, "--encoder-option", "logmel.n_mels=64", "--encoder-option", "logmel.fmax=8000")[0] == 0
    with open_store(store) as fs:
        info = fs.feature_info("logmel")
        assert info.shape == (4, 2, 64, 94) and info.n_done == 4
        assert info.provenance["config"]["n_mels"] == 64 and info.provenance["config"]["fmax"] == 8000
        fingerprint = info.fingerprint
    code, out, _ = run(capsys, *base, "--encoder-option", "logmel.n_mels=64", "--encoder-option", "logmel.fmax=8000")
    assert code == 0 and "0 clips done, 4 skipped" in out
    code, _, err = run(capsys, *base, "--encoder-option", "logmel.n_mels=32")
    assert code == 2 and "n_mels: existing 64, requested 32" in err
    with open_store(store) as fs:
        assert fs.feature_info("logmel").fingerprint == fingerprint

    for option, message in (("logmel.n_mel=64", "logmel: unknown option(s) ['n_mel']; valid: "),
                            ("clip/RN50.strict=false", "no encoder of this run is called that; this run's encoders: logmel"),
                            ("n_mels=64", "expected SPEC_OR_NAME.key=value")):
        code, _, err = run(capsys, *base, "--encoder-option", option)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    vit = ["extract", str(dataset.root), str(tmp_path / "v.zarr"), "--encoders", "vit=timm/test_vit@none", *CLI]
    code, _, err = run(capsys, *vit, "--encoder-option", "vit.colour=1")
    assert code == 2 and "unknown option(s) ['colour']; timm takes strict" in err


def test_option_values_are_json_literals_else_strings_and_targets_may_hold_dots():
    assert encoder_options_argument(["logmel.n_mels=128", "logmel.fmax=null", "logmel.mel_norm=slaney",
                                     "timm/regnety_064.pycls_in1k.drop_rate=0.1", 'x.s="7"', "x.e=a=b"]) == {
        "logmel": {"n_mels": 128, "fmax": None, "mel_norm": "slaney"},
        "timm/regnety_064.pycls_in1k": {"drop_rate": 0.1}, "x": {"s": "7", "e": "a=b"}}
