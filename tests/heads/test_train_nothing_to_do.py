"""``heads train`` of a run that has its epochs already: one line, exit 0, nothing built, well under 2 s."""
from __future__ import annotations

import json
import sys
import time

import pytest

import heads
from heads.cli import main
from heads.config import TrainConfig

from tests.heads._store import build_store


@pytest.fixture
def finished(tmp_path):
    store = build_store(tmp_path / "own.zarr")
    cfg = TrainConfig(head="linear", features=["clip/RN101"], train_split="train", val_split="val",
                      out=str(tmp_path / "lin"), store=str(store), epochs=2, batch_size=16, progress=False,
                      device="cpu")
    heads.train(cfg)
    return cfg


def _no_building(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a head or loader was built although nothing was left to train")

    module = sys.modules["heads.train"]  # heads.train is the function; its module is in sys.modules
    monkeypatch.setattr(module, "build_head", refuse)
    monkeypatch.setattr(module, "make_loaders", refuse)


@pytest.mark.parametrize("epochs, said", [(2, "all 2 epoch(s) are done already"),
                                          (1, "more than --epochs 1 asks for")])
def test_nothing_left_to_train_returns_at_once_saying_so(finished, monkeypatch, capsys, epochs, said):
    metrics = finished.out + "/metrics.jsonl"
    before = open(metrics).read()
    _no_building(monkeypatch)
    capsys.readouterr()
    started = time.perf_counter()
    result = heads.train(TrainConfig(**{**finished.to_dict(), "epochs": epochs}))
    assert time.perf_counter() - started < 2.0
    assert result.nothing_to_do and result.epochs_completed == 2 and result.best_epoch in (1, 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0] and finished.out in err[0]
    assert open(metrics).read() == before


def test_the_cli_says_so_in_one_line_and_json(finished, monkeypatch, capsys):
    _no_building(monkeypatch)
    argv = ["train", "--store", finished.store, "--head", "linear", "--features", "clip/RN101", "--train-split",
            "train", "--val-split", "val", "--out", finished.out, "--batch-size", "16", "--device", "cpu"]
    capsys.readouterr()
    assert main([*argv, "--epochs", "1", "--json"]) == 0
    captured = capsys.readouterr()
    answer = json.loads(captured.out)
    assert answer["nothing_to_do"] is True and answer["epochs_completed"] == 2 and answer["epochs"] == 1
    assert len(captured.err.strip().splitlines()) == 1 and "nothing to train" in captured.err


def test_more_epochs_train_on_and_a_different_run_is_still_refused(finished, capsys):
    result = heads.train(TrainConfig(**{**finished.to_dict(), "epochs": 3}))
    assert not result.nothing_to_do and result.epochs_completed == 3
    with pytest.raises(FileExistsError, match="holds a different run"):  # lr differs: not this run
        heads.train(TrainConfig(**{**finished.to_dict(), "epochs": 1, "lr": 0.5}))


def test_a_run_recorded_before_feature_provenance_still_resumes(finished):
    path = finished.out + "/run.json"
    info = json.load(open(path))
    del info["feature_provenance"]
    json.dump(info, open(path, "w"))
    result = heads.train(TrainConfig(**{**finished.to_dict(), "epochs": 3}))
    assert result.epochs_completed == 3
