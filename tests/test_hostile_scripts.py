"""Hostile review of the end-to-end recipes (scripts/demo.py, scripts/reproduce_dcase2021.py): a folder
made with other settings, ``--fresh`` on a folder that is not a demo, an interrupted dataset, and bad
input that must be refused in seconds, before hours of extraction and training."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import heads
from featurestore.demo import make_demo_dataset, make_demo_eval_dataset
from featurestore.encoders import list_encoders
from featurestore.extract.request import requests
from tests.scripts_support import SCRIPTS, script_module

#: Tiny and fast: a run that the old code let through fails at extraction in seconds (no such encoder).
TINY = ["--clips-per-class", "1", "--clips-per-location", "1", "--duration", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def demo():
    with script_module("demo.py") as module:
        yield module


@pytest.fixture(scope="module")
def reproduce():
    with script_module("reproduce_dcase2021.py") as module:
        yield module


@pytest.fixture(scope="module")
def tiny_dev(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dev") / "dé v"
    return make_demo_dataset(root, clips_per_class=2, duration=1.0, clips_per_location=1, progress=False)


def _stderr_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


# ------------------------------------------------------------------------------------------ demo.py


def test_demo_refuses_a_folder_made_with_other_settings(demo, tmp_path, capsys):
    out = tmp_path / "demo folder é"
    demo.main(["--out", str(out), "--clips-per-class", "2", *TINY[2:], "--encoders", "no_such_family",
               "--frames", "2"])  # fails at extraction; the folder and its settings are there
    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    code = demo.main(["--out", str(out), *TINY, "--encoders", "no_such_family", "--frames", "2"])
    line = _stderr_line(capsys)
    assert code == 2
    assert "--clips-per-class 2 there, 1 asked" in line and "--fresh" in line
    assert sorted(p.name for p in out.iterdir()) == before
    assert json.loads((out / demo.SETTINGS_FILE).read_text())["clips_per_class"] == 2


def test_demo_refuses_a_non_empty_folder_without_settings(demo, tmp_path, capsys):
    out = tmp_path / "old"
    make_demo_dataset(out / "data", clips_per_class=1, duration=1.0, clips_per_location=1, progress=False)
    code = demo.main(["--out", str(out), "--clips-per-class", "2", *TINY[2:], "--encoders", "no_such_family"])
    assert code == 2 and "has no demo_settings.json" in _stderr_line(capsys)
    assert json.loads((out / "data" / "demo_config.json").read_text())["clips_per_class"] == 1


def test_demo_same_settings_resume_and_encoder_order_does_not_matter(demo, tmp_path):
    args = demo.parse_args(["--out", str(tmp_path), "--encoders", "logmel,frames/64"])
    demo.prepare_out(tmp_path / "o", demo.settings(args), fresh=False)
    swapped = demo.parse_args(["--out", str(tmp_path), "--encoders", "frames/64, logmel"])
    demo.prepare_out(tmp_path / "o", demo.settings(swapped), fresh=False)  # no refusal


def test_demo_fresh_never_deletes_a_folder_that_is_not_a_demo(demo, tmp_path, capsys):
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    code = demo.main(["--out", str(out), "--fresh", *TINY, "--encoders", "no_such_family"])
    assert code == 2 and "--fresh deletes only a demo folder" in _stderr_line(capsys)
    assert (out / "thesis.tex").read_text() == "years of work"


def test_demo_fresh_starts_over_in_a_demo_folder(demo, tmp_path):
    out = tmp_path / "o"
    demo.prepare_out(out, {"clips_per_class": 9}, fresh=False)
    (out / "store.zarr").mkdir()
    args = demo.parse_args(["--out", str(out), *TINY])
    demo.prepare_out(out, demo.settings(args), fresh=True)
    assert sorted(p.name for p in out.iterdir()) == [demo.SETTINGS_FILE]


def test_demo_dataset_interrupted_after_meta_csv_is_written_again(demo, tmp_path, capsys):
    """The generator writes meta.csv, the split CSVs, then demo_config.json and dataset.json: a kill in
    between leaves meta.csv with missing or short split files, which the old check (meta.csv exists) reused."""
    data = tmp_path / "data"
    args = demo.parse_args(["--out", str(tmp_path), *TINY])
    make_demo_dataset(data, clips_per_class=1, duration=1.0, clips_per_location=1, progress=False)
    full = (data / "evaluation_setup" / "fold1_train.csv").read_text()
    (data / "evaluation_setup" / "fold1_train.csv").write_text(full.splitlines()[0] + "\n")  # half-written
    (data / "demo_config.json").unlink()
    (data / "dataset.json").unlink()
    demo.make_dataset(data, args)
    assert "writing it again" in capsys.readouterr().out
    assert (data / "evaluation_setup" / "fold1_train.csv").read_text() == full
    assert (data / "dataset.json").is_file()


def test_demo_dataset_of_other_settings_is_not_reused(demo, tmp_path):
    data = tmp_path / "data"
    make_demo_dataset(data, clips_per_class=1, duration=1.0, clips_per_location=1, progress=False)
    args = demo.parse_args(["--out", str(tmp_path), *TINY, "--clips-per-class", "2"])
    demo.make_dataset(data, args)
    assert json.loads((data / "demo_config.json").read_text())["clips_per_class"] == 2


def test_ctrl_c_in_a_step_exits_130_and_says_how_to_resume(demo, monkeypatch, capsys):
    import _steps

    monkeypatch.setitem(_steps._MAINS, "heads", lambda argv: 130)
    with pytest.raises(_steps.StepFailed) as caught:
        _steps.Transcript().run("heads", "train")
    assert _steps.fail(caught.value) == 130 and "rerun the same command" in capsys.readouterr().err


# ---------------------------------------------------------------------------- reproduce_dcase2021.py


def test_reproduce_refuses_encoders_that_miss_a_recipes_features(reproduce, tmp_path, capsys):
    code = reproduce.main(["--dataset", str(tmp_path), "--out", str(tmp_path / "o"), "--encoders",
                           "logmel,clip/RN50x4,clip/RN101,clip/ViT-B-32,cliptext/RN50x4,cliptext/RN101", "--dry-run"])
    line = _stderr_line(capsys)
    assert code == 2 and "frames/448 (needed by V01_frame_cnn" in line
    assert "cliptext/ViT-B-32 (needed by C03_zero_shot_ViT-B-32.json)" in line
    assert not (tmp_path / "o").exists()


def test_reproduce_checks_the_evaluation_set_before_extraction(reproduce, tiny_dev, tmp_path, capsys):
    ev = make_demo_eval_dataset(tmp_path / "eval", n_clips=2, progress=False)
    (ev / "video" / "1.mp4").unlink()
    code = reproduce.main(["--dataset", str(tiny_dev), "--eval-dataset", str(ev), "--out", str(tmp_path / "o"),
                           "--encoders", reproduce.PAPER_ENCODERS.replace(",", "@none,") + "@none", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"reproduce_dcase2021: error: --eval-dataset {ev}:") and "1.mp4" in err
    assert not (tmp_path / "o").exists()  # nothing extracted


def test_reproduce_refuses_an_unlabelled_set_as_the_development_set(reproduce, tmp_path, capsys):
    ev = make_demo_eval_dataset(tmp_path / "eval", n_clips=2, progress=False)
    code = reproduce.main(["--dataset", str(ev), "--out", str(tmp_path / "o"), "--device", "cpu"])
    line = _stderr_line(capsys)
    assert code == 2 and "--dataset" in line and "no split fold1_train, fold1_evaluate" in line
    assert not (tmp_path / "o").exists()


def test_reproduce_refuses_a_development_set_missing_files(reproduce, tiny_dev, tmp_path, capsys):
    dev = tmp_path / "dev"
    shutil.copytree(tiny_dev, dev)
    next((dev / "audio").glob("*.wav")).unlink()
    code = reproduce.main(["--dataset", str(dev), "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert code == 2 and "files of dataset" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_reproduce_refuses_an_out_whose_store_holds_another_dataset(reproduce, tiny_dev, tmp_path, capsys):
    """A second --dataset into the same --out: extract would add its clips to the first one's store."""
    from featurestore import create_store
    from featurestore.datasets import open_dataset

    other = make_demo_dataset(tmp_path / "other", clips_per_class=2, duration=1.0, clips_per_location=1, seed=3,
                              progress=False)
    create_store(tmp_path / "o" / reproduce.DEV_STORE, open_dataset(other)).close()
    code = reproduce.main(["--dataset", str(tiny_dev), "--out", str(tmp_path / "o"), "--device", "cpu"])
    line = _stderr_line(capsys)
    assert code == 2 and f"holds clips of {other}, not of --dataset {tiny_dev}" in line


def test_reproduce_submits_the_evaluation_split(reproduce, tmp_path, capsys):
    """An evaluation store has fold1_test only; without --split, submit scored the recipe's eval_split
    (fold1_evaluate) and failed after every other step had run."""
    assert reproduce.main(["--dataset", str(tmp_path), "--eval-dataset", str(tmp_path), "--out", str(tmp_path / "o"),
                           "--dry-run"]) == 0
    (submit,) = [l for l in capsys.readouterr().out.splitlines() if l.startswith("$ fusion submit")]
    assert "--split fold1_test" in submit


# -------------------------------------------------------------------------------------------- recipes


def _encoder_names(specs: str) -> set[str]:
    return {r.name for r in requests(specs)}


def test_frozen_recipes_load_and_use_what_frozen_video_extracts(reproduce):
    frozen = sorted((SCRIPTS / "recipes" / "frozen").glob("*.json"))
    assert frozen
    for recipe in frozen:
        cfg = heads.TrainConfig.from_json(recipe)
        heads.make_config(cfg.head, cfg.head_config)
        assert set(cfg.features) <= _encoder_names(reproduce.FROZEN_ENCODERS), recipe.name


def test_every_encoder_the_scripts_extract_is_registered(demo, reproduce):
    known = set(list_encoders(models=True))
    families = set(list_encoders())
    for specs in (demo.DEMO_ENCODERS, reproduce.PAPER_ENCODERS, reproduce.FROZEN_ENCODERS):
        for item in requests(specs):
            family = item.name.split("/")[0]
            assert family in families, item.spec
            assert item.name in known or family not in {k.split("/")[0] for k in known if "/" in k}, item.spec


def test_every_recipe_backbone_is_a_timm_model():
    import timm

    for recipe in sorted((SCRIPTS / "recipes").rglob("*.json")):
        if "fusion" in recipe.parts:
            continue
        backbone = heads.TrainConfig.from_json(recipe).head_config.get("backbone")
        if backbone:
            weights = heads.TrainConfig.from_json(recipe).head_config.get("weights", "")
            tag = weights.split(":", 1)[1] if weights.startswith("pretrained:") else None
            assert timm.is_model(backbone), recipe.name
            if tag:
                assert f"{backbone}.{tag}" in timm.list_models(backbone, pretrained=True), recipe.name
