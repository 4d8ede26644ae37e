"""Typed train and head configs: a value of the wrong type or out of range is refused when loaded.

Real recipe files through `TrainConfig.from_json` and ``heads train``, and ``--set`` values through the
command line: one line naming the file, the dotted key, the value and what was expected; exit 2; no
run directory, lock or checkpoint written.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import heads
from heads.cli import main
from heads.config import ConfigError, TrainConfig, parse_head_set

BASE = {"head": "linear", "features": ["clip/RN101"], "train_split": "train", "val_split": "val", "epochs": 1}

# (what to change in a good recipe, the words the one-line error must hold)
BAD = {
    "epochs as a word": ({"epochs": "five"}, ['epochs: expected a valid integer, got "five" (a string)']),
    "negative epochs": ({"epochs": -1}, ["epochs: expected >= 0, got -1 (an integer)"]),
    "zero batch": ({"batch_size": 0}, ["batch_size: expected >= 1, got 0"]),
    "zero lr": ({"lr": 0}, ["lr: expected > 0", "got 0"]),
    "lr as a string": ({"lr": "0.1"}, ['lr: expected a valid number, got "0.1" (a string)']),
    "an unknown loss": ({"loss": "hinge"}, ["loss: expected 'focal' or 'cross_entropy'", '"hinge"']),
    "an empty split": ({"train_split": ""}, ["train_split: expected a string of at least 1 character(s)"]),
    "no features": ({"features": []}, ["features: expected at least 1 item(s), got []"]),
    "a milestone of zero": ({"lr_milestones": [5, 0]}, ["lr_milestones[1]: expected >= 1, got 0"]),
    "cache as a string": ({"cache": "yes"}, ['cache: expected a valid boolean, got "yes" (a string)']),
    "an unknown key": ({"epoch": 3}, ["unknown key(s) ['epoch']; allowed keys are", "'epochs'"]),
    "a head field as a string": ({"head_config": {"l2_normalize": "true"}},
                                 ['head_config.l2_normalize: expected a valid boolean, got "true" (a string)']),
    "an unknown head field": ({"head_config": {"hiddn": [8]}},
                              ["head_config: unknown field(s) for head 'linear': hiddn; known: input_dims"]),
    "a head field out of range": ({"head": "embedding_mlp", "head_config": {"dropout": 1.5}},
                                  ["head_config.dropout: expected <= 1, got 1.5"]),
}


def _recipe(tmp_path: Path, change: dict) -> Path:
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({**BASE, **change}))
    return path


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_value_is_refused_when_the_recipe_is_loaded(case, tmp_path):
    change, words = BAD[case]
    path = _recipe(tmp_path, change)
    with pytest.raises(ConfigError) as refused:
        TrainConfig.from_json(path)
    message = str(refused.value)
    assert message.startswith(f"recipe {str(path)!r}: ") and "\n" not in message
    for word in words:
        assert word in message


def test_python_callers_and_assignments_get_the_same_checks():
    with pytest.raises(ConfigError, match=r"^TrainConfig: epochs: expected a valid integer, got \"five\""):
        TrainConfig(head="linear", features=["x"], epochs="five")
    cfg = TrainConfig(head="linear", features="a,b")  # "a,b" is still the list of two feature sets
    assert cfg.features == ["a", "b"]
    with pytest.raises(ConfigError, match=r"^TrainConfig: head_config.l2_normalize: expected a valid boolean"):
        cfg.head_config = {"l2_normalize": "maybe"}
    assert cfg.head_config == {}
    with pytest.raises(ConfigError, match=r"^LateFusionConfig: dropout: expected <= 1, got 2"):
        heads.make_config("late_fusion", {"dropout": 2})
    with pytest.raises(TypeError, match="hiddn"):  # an unknown field stays a TypeError, as a bad keyword is
        heads.make_config("linear", {"hiddn": 3})


def test_set_strings_are_parsed_into_the_fields_type():
    parsed = parse_head_set("frame_cnn", ["augment=false", "backbone=123", "image_size=null", "mean=[0.1,0.2,0.3]",
                                          "erasing_p=0.25"])
    assert parsed == {"augment": False, "backbone": "123", "image_size": None, "mean": [0.1, 0.2, 0.3],
                      "erasing_p": 0.25}
    with pytest.raises(ConfigError, match=r"--set head_config.l2_normalize: expected a valid boolean.*got 'maybe'"):
        parse_head_set("linear", ["l2_normalize=maybe"])
    with pytest.raises(ConfigError, match=r"--set hiddn: head 'linear' has no such field; known: input_dims"):
        parse_head_set("linear", ["hiddn=3"])


def _train_argv(store: Path, out: Path) -> list[str]:
    return ["train", "--store", str(store), "--head", "linear", "--features", "clip/RN101", "--train-split", "train",
            "--val-split", "val", "--out", str(out), "--epochs", "1", "--quiet"]


def _nothing_written(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(out.name + "*"))


@pytest.mark.parametrize("flags, words", [
    (["--set", "l2_normalize=maybe"], "--set head_config.l2_normalize: expected a valid boolean, unable to interpret "
                                      "input, got 'maybe'"),
    (["--set", "n_classes=0"], "--set head_config.n_classes: expected >= 1, got '0'"),
    (["--lr", "0"], "lr: expected > 0"),
    (["--batch-size", "0"], "batch_size: expected >= 1, got 0"),
    (["--features", ","], "features: expected at least 1 item(s), got []"),
])
def test_cli_refuses_bad_flags_in_one_line_and_trains_nothing(flags, words, tiny_store_path, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*_train_argv(tiny_store_path, out), *flags]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("heads train: error: ") and words in err[0], err
    assert _nothing_written(out)


def test_cli_refuses_a_recipe_with_a_word_for_epochs(tiny_store_path, tmp_path, capsys):
    path = _recipe(tmp_path, {"epochs": "five"})
    out = tmp_path / "run"
    assert main(["train", "--recipe", str(path), "--store", str(tiny_store_path), "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"heads train: error: recipe {str(path)!r}: epochs: expected a valid integer, got \"five\" (a string)"]
    assert _nothing_written(out)


def test_cli_set_true_records_a_boolean(tiny_store_path, tmp_path):
    out = tmp_path / "run"
    assert main([*_train_argv(tiny_store_path, out), "--set", "l2_normalize=true"]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["head_config"]["l2_normalize"] is True and info["train"]["head_config"] == {"l2_normalize": True}


def test_set_values_are_parsed_into_the_fields_type_so_a_digit_string_stays_a_string(tmp_path):
    """``--set backbone=123`` is the string '123' (a backbone name), not the JSON number 123."""
    from heads.cli import _parser, train_config_from_args

    args = _parser().parse_args(["train", "--store", "s.zarr", "--head", "spectrogram_cnn", "--features", "logmel",
                                 "--set", "backbone=123", "--set", "drop_rate=0.5", "--out", str(tmp_path / "r")])
    cfg = train_config_from_args(args)
    assert cfg.head_config["backbone"] == "123" and cfg.head_config["drop_rate"] == 0.5
