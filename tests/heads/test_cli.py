"""The ``heads`` command line and the recipe files."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import heads
from heads.cli import main
from heads.config import TrainConfig

from tests.heads._store import N_CLIPS, build_store

RECIPES = Path(__file__).resolve().parents[2] / "scripts" / "recipes"
ALL_RECIPES = sorted(RECIPES.glob("*.json")) + sorted((RECIPES / "paper").glob("*.json"))


def test_list_names_every_head(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in heads.list_heads())
    assert main(["list", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == set(heads.list_heads())


def test_train_then_predict_from_flags(tiny_store_path, tmp_path, capsys):
    from featurestore.store import open_store

    own = build_store(tmp_path / "own.zarr")  # a store of our own to write predictions into
    out = tmp_path / "runs" / "mlp"
    code = main(["train", "--store", str(own), "--head", "embedding_mlp", "--features", "clip/RN101,clip/ViT-B-32",
                 "--train-split", "train", "--val-split", "val", "--out", str(out), "--epochs", "2",
                 "--batch-size", "16", "--set", "hidden=[32]", "--set", "dropout=0.1", "--quiet", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["best_epoch"] in (1, 2) and (out / "best.safetensors").exists()
    info = json.loads((out / "run.json").read_text())
    assert info["head_config"]["hidden"] == [32] and info["head_config"]["input_dims"] == [16, 16]
    assert main(["predict", "--store", str(own), "--run", str(out), "--no-progress", "--json"]) == 0  # old spelling
    captured = capsys.readouterr()
    assert json.loads(captured.out)["clips"] == N_CLIPS and "clip/s" not in captured.err  # no bar
    assert "predict mlp: wrote" in captured.err  # the summary line, on stderr
    with open_store(own) as store:
        assert store.get_predictions("mlp").shape[0] == N_CLIPS


def test_train_from_a_recipe_with_overrides(tiny_store_path, tmp_path, capsys):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"description": "x", "head": "linear", "features": ["clip/RN101"],
                                  "train_split": "train", "val_split": "val", "epochs": 9, "batch_size": 16}))
    out = tmp_path / "lin"
    code = main(["train", "--recipe", str(recipe), "--store", str(tiny_store_path), "--out", str(out),
                 "--epochs", "1", "--quiet"])
    assert code == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_missing_arguments_and_bad_values_exit_with_a_message(capsys, tmp_path):
    assert main(["train", "--head", "linear"]) == 2
    assert "--store" in capsys.readouterr().err
    assert main(["train", "--store", str(tmp_path / "absent.zarr"), "--head", "linear", "--features", "x"]) == 2
    assert "no feature store" in capsys.readouterr().err


def test_bad_head_fields_and_recipes_exit_2_naming_what_is_wrong(tiny_store_path, tmp_path, capsys):
    base = ["train", "--store", str(tiny_store_path), "--features", "clip/RN101", "--train-split", "train",
            "--val-split", "val", "--out", str(tmp_path / "r"), "--epochs", "1", "--quiet"]
    assert main([*base, "--head", "linear", "--set", "hiddn=[8]"]) == 2
    err = capsys.readouterr().err
    assert "hiddn" in err and "known: input_dims" in err and "Traceback" not in err
    assert main([*base, "--head", "nohead"]) == 2
    assert "heads train: error: no head named 'nohead'; registered heads: embedding_mlp" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert main(["train", "--recipe", str(broken), "--store", str(tiny_store_path)]) == 2
    assert str(broken) in capsys.readouterr().err
    headless = tmp_path / "headless.json"
    headless.write_text(json.dumps({"features": ["clip/RN101"]}))
    assert main(["train", "--recipe", str(headless), "--store", str(tiny_store_path)]) == 2
    err = capsys.readouterr().err
    assert str(headless) in err and "head" in err and "missing" in err


def test_device_is_read_the_same_way_by_extract_train_and_predict(tiny_store_path, tmp_path, capsys):
    from featurestore.cli import main as featurestore_main
    from featurestore.encoders import DEVICE_HELP, resolve_device

    for argv, run in ((["extract", "--help"], featurestore_main), (["train", "--help"], main),
                      (["predict", "--help"], main)):
        try:
            assert run(argv) == 0
        except SystemExit as stop:  # argparse's --help in the heads parser
            assert stop.code == 0
        assert " ".join(DEVICE_HELP.split()) in " ".join(capsys.readouterr().out.split())
    with pytest.raises(ValueError) as expected:
        resolve_device("banana")
    train = ["train", "--store", str(tiny_store_path), "--head", "linear", "--features", "clip/RN101",
             "--out", str(tmp_path / "r"), "--device", "banana"]
    predict = ["predict", "--store", str(tiny_store_path), "--run", str(tmp_path / "r"), "--device", "banana"]
    for argv in (train, predict):
        assert main(argv) == 2
        assert str(expected.value) in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_predict_into_a_missing_store_fails_instead_of_creating_one(tmp_path, capsys):
    typo = tmp_path / "tpyo.zarr"
    assert main(["predict", "--store", str(typo), "--run", str(tmp_path / "r"), "--device", "cpu"]) == 2
    assert str(typo) in capsys.readouterr().err
    assert not typo.exists()


@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda p: p.name)
def test_recipes_are_valid_train_configs(path):
    cfg = TrainConfig.from_json(path)
    cls = heads.head_class(cfg.head)
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    assert set(cfg.head_config) <= fields, f"{path.name}: unknown head config fields"
    assert cfg.features and cfg.train_split == "fold1_train" and cfg.val_split == "fold1_evaluate"


def test_the_paper_recipes_are_all_there():
    names = {p.name.split("_")[0] for p in (RECIPES / "paper").glob("*.json")}
    assert names == {"A01", "A02", "A03", "V01", "V02", "V03", "C01", "C02", "C03", "C04"}
