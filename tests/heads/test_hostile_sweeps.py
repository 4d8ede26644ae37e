"""Hostile sweeps: a sweep's table compares trials trained on the same, right data, or the sweep is refused.

Each test gives ``heads sweep`` (or ``heads.sweep``) something a user really gives it: a store rewritten
between two runs of one sweep, a validation split that is the training split, ``--out`` naming the store
or a file, seeds and grid axes from Python, a range whose rounded draws leave it, a trial that diverges.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import heads
from featurestore.store import open_store
from heads.cli import main
from heads.config import TrainConfig
from heads.sweep import Range, SweepError, parse_grid

from tests.heads._store import build_store
from tests.heads.test_hostile_training_runs import FEATURE, _append_clips


def _argv(store: Path, out: Path, *extra: str, epochs: int = 1) -> list[str]:
    return ["sweep", "--store", str(store), "--head", "linear", "--features", FEATURE, "--train-split", "train",
            "--val-split", "val", "--epochs", str(epochs), "--batch-size", "16", "--out", str(out), "-q", *extra]


def _err_line(capsys) -> str:
    """The one error line, last on stderr (trials finished before it log their one line each)."""
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error" in line]
    assert errors == err[-1:] and errors[0].startswith("heads sweep: error: "), err
    return errors[0]


def _negate_features(store_path: Path) -> None:
    """Rewrite the feature set with other values and the same provenance (so the same fingerprint)."""
    with open_store(store_path, mode="a") as store:
        values = np.asarray(store.read_rows(FEATURE, 0, store.n_clips), dtype=np.float32)
        store.write_rows(FEATURE, 0, (-values).astype(np.float16))


def _append_to_val(store_path: Path) -> None:
    with open_store(store_path, mode="a") as store:
        _append_clips(store, 16, "val")


@pytest.mark.parametrize("change, differs", [(_negate_features, f"data.data_versions.{FEATURE}"),
                                             (_append_to_val, "data.splits.val")])
def test_a_finished_trial_of_data_since_changed_is_refused_not_tabled_beside_new_trials(tmp_path, capsys, change,
                                                                                         differs):
    """Before: the finished lr=0.1 trial (trained on the old data) was skipped by its fingerprints, the added
    lr=0.01 trained on the new data, and the table and 'best' compared the two, exit 0."""
    store, out = build_store(tmp_path / "s.zarr"), tmp_path / "sw"
    assert main(_argv(store, out, "--grid", "lr=0.1")) == 0
    stale = out / "lr=0.1" / "seed_0"
    before = (stale / "best.safetensors").read_bytes()
    change(store)
    capsys.readouterr()
    assert main(_argv(store, out, "--grid", "lr=0.1,0.01")) == 2
    line = _err_line(capsys)
    assert str(stale) in line and differs in line and "--overwrite" in line, line
    assert not (out / "lr=0.01").exists()  # refused before anything trained
    assert (stale / "best.safetensors").read_bytes() == before
    assert main(_argv(store, out, "--grid", "lr=0.1,0.01", "--overwrite", "--json")) == 0  # the way out
    summary = json.loads(capsys.readouterr().out)
    assert summary["trained"] == 2 and (stale / "best.safetensors").read_bytes() != before


@pytest.mark.parametrize("extra", [
    ["--val-split", "train", "--grid", "lr=0.1,0.01"],  # stacked trials
    ["--val-split", "train", "--grid", "lr=0.1"],  # one trial: the shared-read path
    ["--grid", "val_split=val,train"],  # a swept validation split
])
def test_a_validation_split_sharing_the_training_clips_is_refused_before_anything_trains(tiny_store_path, tmp_path,
                                                                                          capsys, extra):
    """`heads train` refuses it; the sweep's shared and stacked trials bypassed that check and tabled the
    accuracy of clips the heads trained on (1.0), picking 'best' by it."""
    out = tmp_path / "sw"
    assert main(_argv(tiny_store_path, out, *extra)) == 2
    line = _err_line(capsys)
    assert "val_split 'train' shares 48 clip(s) with train_split 'train'" in line, line
    assert not out.exists() and not list(tmp_path.glob("*.lock"))


def _store_files(store: Path) -> list[str]:
    return sorted(str(p.relative_to(store)) for p in store.rglob("*"))


@pytest.mark.parametrize("where, expected", [("store", "is the store"), ("inside", "is inside the store"),
                                             ("file", "is a file, not a sweep directory")])
def test_a_sweep_out_that_is_the_store_inside_it_or_a_file_is_refused_before_anything(tmp_path, capsys, where,
                                                                                       expected):
    """Before: the store and inside it, exit 0 with trial runs, results and the 'best' link among the store's
    arrays (`heads train` refuses both); a file: a bare ``[Errno 17] File exists`` after its lock was made."""
    store = build_store(tmp_path / "s.zarr")
    out = {"store": store, "inside": store / "sweeps" / "x", "file": tmp_path / "notes.txt"}[where]
    if where == "file":
        out.write_text("mine\n")
    files = _store_files(store)
    assert main(_argv(store, out, "--grid", "lr=0.1")) == 2
    line = _err_line(capsys)
    assert f"--out {str(out)!r} {expected}" in line, line
    assert _store_files(store) == files and not list(tmp_path.glob("*.lock"))
    assert where != "file" or out.read_text() == "mine\n"


@pytest.mark.parametrize("seeds, grid, expected", [
    ([0, 0], {"lr": [0.1]}, "seeds: expected distinct integers >= 0"),  # before: StoreLockedError after training
    ([], {"lr": [0.1]}, "seeds: expected distinct integers >= 0 (at least one), got []"),  # before: 0 trials, exit 0
    ([True], {"lr": [0.1]}, "seeds: expected distinct integers"),
    ([0], {"lr": []}, "grid lr: no values"),  # before: a sweep of nothing that wrote an empty table
    ([0], {"loss": "focal"}, "grid loss: expected a list of values, got 'focal'"),  # before: swept 'f', 'o', ...
    ([0], {"lr": 0.1}, "grid lr: expected a list of values, got 0.1"),  # before: a bare TypeError
])
def test_python_seeds_and_grid_axes_are_refused_in_one_line_before_anything(tiny_store_path, tmp_path, seeds, grid,
                                                                            expected):
    base = TrainConfig(head="linear", features=[FEATURE], train_split="train", val_split="val", epochs=1,
                       batch_size=16, progress=False, store=str(tiny_store_path))
    out = tmp_path / "sw"
    with pytest.raises(SweepError) as raised:
        heads.sweep(base, grid, seeds=seeds, out=out)
    assert expected in str(raised.value) and "\n" not in str(raised.value)
    assert not out.exists()


def test_a_key_both_in_the_grid_and_a_range_is_refused(tiny_store_path, tmp_path):
    """Before: the drawn values replaced the grid's 0.1 and 0.01 without a word (``{**grid_values, **draws}``)."""
    base = TrainConfig(head="linear", features=[FEATURE], train_split="train", val_split="val", epochs=1,
                       batch_size=16, progress=False, store=str(tiny_store_path))
    out = tmp_path / "sw"
    with pytest.raises(SweepError, match="grid lr: given both as grid values and as a range"):
        heads.sweep(base, {"lr": [0.1, 0.01]}, ranges={"lr": "log:1e-3:1e-1"}, samples=2, seeds=[0], out=out)
    assert not out.exists()


def test_values_equal_as_their_fields_type_are_one_configuration(tiny_store_path, tmp_path):
    """Before: ``weight_decay: [0, 0.0]`` named two directories and trained the same trial twice (two rows)."""
    base = TrainConfig(head="linear", features=[FEATURE], train_split="train", val_split="val", epochs=1,
                       batch_size=16, progress=False, store=str(tiny_store_path))
    out = tmp_path / "sw"
    result = heads.sweep(base, {"weight_decay": [0, 0.0], "lr": [0.1, 0.1]}, seeds=[0], out=out)
    assert len(result.trials) == 1 and len(result.rows) == 1 and result.trained == 1
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and not p.is_symlink()) == ["lr=0.1,weight_decay=0"]


@pytest.mark.parametrize("extra, trial", [
    (["--grid", "lr=0.1,3e38", "--max-steps-per-epoch", "1"], "lr=3e+38"),  # stacked: the weights' check
    (["--grid", "lr=0.1,1e30", "--no-stack"], "lr=1e+30"),  # one after another: the loss's check
])
def test_a_diverging_trial_is_named_by_the_sweeps_error(tiny_store_path, tmp_path, capsys, extra, trial):
    """Before: ``heads sweep: error: the weights became NaN or infinite in epoch 1 (fc.weight, fc.bias) ...``
    (or ``the training loss became nan ...``): which of the sweep's trials was not said."""
    out = tmp_path / "sw"
    assert main(_argv(tiny_store_path, out, *extra)) == 1
    line = _err_line(capsys)
    assert f"trial {out / trial / 'seed_0'}: " in line and "became" in line, line


def test_a_stacked_trial_whose_validation_probabilities_overflow_is_named_not_scored(tiny_store_path, tmp_path,
                                                                                      capsys):
    """lr 1e38 on unnormalised inputs leaves the weights finite after one step, but the validation logits
    overflow to inf and the softmax gives NaN. Before: stacked trials scored argmax(NaN) = class 0 and committed the epoch, where
    ``heads train`` (and an unstacked trial) stop as a divergence."""
    out = tmp_path / "sw"
    assert main(_argv(tiny_store_path, out, "--grid", "lr=0.1,1e38", "--grid", "l2_normalize=False",
                      "--max-steps-per-epoch", "1")) == 1
    trial = out / "lr=1e+38,l2_normalize=False" / "seed_0"
    line = _err_line(capsys)
    assert f"trial {trial}: the validation probabilities became NaN" in line, line
    assert not (trial / "state.json").exists()


@pytest.mark.parametrize("kind, low, high", [("lin", 0.9, 0.9999), ("log", 1.234e-4, 1e-3), ("lin", 0.01234, 0.05)])
def test_drawn_values_stay_inside_their_range(kind, low, high):
    """Before: rounding to 3 significant digits drew momentum ``lin:0.9:0.9999`` as 1.0 (SGD momentum without
    decay), ``log:1.234e-4:1e-3`` as 0.000123: values outside the range asked for."""
    rng = np.random.default_rng(0)
    draws = [Range(kind, low, high).draw(rng) for _ in range(3000)]
    assert all(low <= v <= high for v in draws), sorted(v for v in draws if not low <= v <= high)[:5]
    assert all(float(repr(v)) == v and len(repr(v)) <= 20 for v in draws)  # still a short, exact name


def test_draws_inside_the_range_keep_their_3_digits():
    """A guard, not a fault: sweeps drawn before keep their directory names (a 3-digit value inside the range is
    not given more digits), so they resume."""
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(500):
        value = float(np.exp(b.uniform(np.log(1e-3), np.log(1e-1))))
        assert Range("log", 1e-3, 1e-1).draw(a) == float(f"{value:.3g}")


def test_an_int_range_with_fractional_ends_and_a_negative_sample_seed_are_one_line(tiny_store_path, tmp_path, capsys):
    """Before: ``int:1.5:4`` drew 1, below the range; ``--sample-seed -1`` was numpy's ``expected non-negative
    integer``, naming neither the flag nor the value."""
    with pytest.raises(SweepError, match="int range ends must be integers"):
        parse_grid("late_fusion", ["hidden=int:1.5:4"])
    out = tmp_path / "sw"
    assert main(_argv(tiny_store_path, out, "--grid", "lr=log:1e-3:1e-1", "--samples", "2",
                      "--sample-seed", "-1")) == 2
    assert "--sample-seed must be an integer >= 0, got -1" in _err_line(capsys)
    assert not out.exists()


def test_a_rerun_asking_fewer_epochs_than_trials_have_done_is_refused_not_tabled(tiny_store_path, tmp_path, capsys):
    """Before: the 3-epoch lr=0.1 trial stayed as it was ("nothing to train"), the added lr=0.01 trained 1 epoch,
    and the table and 'best' compared a best of 3 epochs with a best of 1 under ``epochs: 1`` in sweep.json."""
    out = tmp_path / "sw"
    assert main(_argv(tiny_store_path, out, "--grid", "lr=0.1", epochs=3)) == 0
    capsys.readouterr()
    assert main(_argv(tiny_store_path, out, "--grid", "lr=0.1,0.01", epochs=1)) == 2
    line = _err_line(capsys)
    assert f"{out / 'lr=0.1' / 'seed_0'} (3 done)" in line and "--epochs 3" in line, line
    assert not (out / "lr=0.01").exists()
    assert main(_argv(tiny_store_path, out, "--grid", "lr=0.1,0.01", epochs=3)) == 0  # the same epochs: trains on
    assert (out / "lr=0.01" / "seed_0" / "best.safetensors").is_file()


def test_a_sweep_without_a_best_removes_the_best_an_earlier_sweep_left(tiny_store_path, tmp_path):
    """Before: rerun with ``--overwrite`` and no epoch trained (no configuration has val_accuracy), the table
    had no best, but best.json still named lr=0.1 with the earlier mean accuracy and 'best' still led to it.
    (A sweep without a validation split is now refused for a ``val_*`` metric, so ``epochs=0`` gets there.)"""
    base = TrainConfig(head="linear", features=[FEATURE], train_split="train", val_split="val", epochs=1,
                       batch_size=16, progress=False, store=str(tiny_store_path))
    out = tmp_path / "sw"
    assert heads.sweep(base, {"lr": [0.1, 0.01]}, seeds=[0], out=out).best is not None
    assert (out / "best.json").is_file() and (out / "best").is_symlink()
    base.epochs = 0
    result = heads.sweep(base, {"lr": [0.1, 0.01]}, seeds=[0], out=out, overwrite=True)
    assert result.best is None and json.loads((out / "results.json").read_text())["best"] is None
    assert not (out / "best.json").exists() and not (out / "best").is_symlink()


def test_a_sweep_into_the_run_directory_of_heads_train_is_refused(tiny_store_path, tmp_path, capsys, monkeypatch):
    """Both commands default to ``--out runs/run``. Before: the sweep wrote its trials, table and 'best' among
    the run's files, exit 0, and the next ``heads train --overwrite`` (same default) deleted them all."""
    monkeypatch.chdir(tmp_path)
    common = ["--store", str(tiny_store_path), "--head", "linear", "--features", FEATURE, "--train-split", "train",
              "--val-split", "val", "--epochs", "1", "-q"]
    assert main(["train", *common]) == 0
    run = sorted(p.name for p in (tmp_path / "runs" / "run").iterdir())
    capsys.readouterr()
    assert main(["sweep", *common, "--grid", "lr=0.1,0.01"]) == 2
    line = _err_line(capsys)
    assert "--out 'runs/run' is the run directory of a `heads train` run (it holds run.json)" in line, line
    assert sorted(p.name for p in (tmp_path / "runs" / "run").iterdir()) == run
