"""Hostile draws: random choices that look independent and reproducible, and are.

The store's worker loader (each worker's shuffle its own, the same on a rerun) and the sweep's random
search and naming (N distinct draws, names and draws that do not depend on the order of the flags, a
metric the sweep can compute).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import heads
from featurestore.torchdata import Batch, StoreDataset, WorkerLoader
from heads.cli import main
from heads.config import TrainConfig
from heads.sweep import Range, SweepError, configurations

FEATURE = "clip/ViT-B-32"


# ------------------------------------------------------------------------------- worker loader
def _worker_orders(path: Path, seed: int) -> tuple[list[int], list[list[int]]]:
    """The rows an epoch of two workers emits, and each read group's shuffle as positions in its own rows."""
    ds = StoreDataset(str(path), FEATURE, level="clip", batch_size=4, shuffle=True, seed=seed, shuffle_buffer=8,
                      block_clips=8)
    loader = WorkerLoader(ds, num_workers=2)
    emitted = [int(r) for batch in loader for r in batch.rows]
    loader.close()
    groups = ds._read_group_plan(np.random.default_rng([seed, 0]))  # in this process: every read group
    perms = []
    for blocks in groups:
        rows = np.concatenate([start + local for start, _, local in blocks]).tolist()
        perms.append([rows.index(r) for r in emitted if r in rows])
    return emitted, perms


def test_loader_workers_shuffle_their_read_groups_each_by_its_own_order_and_reproducibly(tiny_store_path):
    """Before: both workers left the shared generator in one state after the block order, so worker 0's first
    read group and worker 1's first were shuffled by the very same permutation (and so on down the epoch)."""
    emitted, perms = _worker_orders(tiny_store_path, seed=5)
    assert sorted(emitted) == list(range(64)) and all(sorted(p) == list(range(8)) for p in perms)
    firsts = (perms[0], perms[1])  # worker 0 builds read groups 0, 2, ...; worker 1 builds 1, 3, ...
    assert firsts[0] != firsts[1], firsts
    assert [perms[i] for i in range(0, 8, 2)] != [perms[i] for i in range(1, 8, 2)]
    again, perms_again = _worker_orders(tiny_store_path, seed=5)
    assert again == emitted and perms_again == perms
    other, _ = _worker_orders(tiny_store_path, seed=6)
    assert other != emitted


class _TorchDraws(StoreDataset):
    """One batch per worker whose rows are draws of torch's global generator in that worker."""

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info.id == 0 or info.id == 1:
            yield Batch([torch.zeros(2)], torch.zeros(2, dtype=torch.long), torch.randint(0, 2**62, (2,)),
                        torch.full((2,), info.id))


def test_loader_workers_global_generators_are_distinct_and_the_same_on_a_rerun(tiny_store_path):
    """Before: torch seeded each worker with a fresh random base seed + its id: distinct, but no rerun of a
    seeded run drew alike (an augmentation or dropout drawn in a worker differed run to run)."""
    def draws(seed: int) -> dict[int, list[int]]:
        loader = WorkerLoader(_TorchDraws(str(tiny_store_path), FEATURE, batch_size=2, seed=seed), num_workers=2)
        out = {int(b.segments[0]): b.rows.tolist() for b in loader}
        loader.close()
        return out

    first = draws(3)
    assert set(first) == {0, 1} and first[0] != first[1]
    assert draws(3) == first and draws(4) != first


# ------------------------------------------------------------------------------------- sweeps
def _argv(store: Path, out: Path, *extra: str) -> list[str]:
    return ["sweep", "--store", str(store), "--head", "linear", "--features", FEATURE, "--train-split", "train",
            "--val-split", "val", "--epochs", "1", "--batch-size", "16", "--out", str(out), "-q", "--json", *extra]


def _base(store: Path, **fields) -> TrainConfig:
    return TrainConfig(**{"head": "linear", "features": [FEATURE], "train_split": "train", "val_split": "val",
                          "epochs": 1, "batch_size": 16, "progress": False, "store": str(store), **fields})


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("heads sweep: error: "), err
    return err[-1]


def test_random_search_draws_as_many_distinct_configurations_as_asked():
    """Before: ``int:1:4`` drawn 4 times (sample seed 0) repeated a value: 3 configurations, not 4, without a word."""
    drawn = configurations({}, {"epochs": Range("int", 1, 4)}, samples=4, sample_seed=0)
    assert sorted(c["epochs"] for c in drawn) == [1, 2, 3, 4]
    floats = configurations({}, {"lr": Range("lin", 0.01, 0.02)}, samples=60, sample_seed=1)  # ~100 3-digit values
    assert len({c["lr"] for c in floats}) == 60


@pytest.mark.parametrize("ranges, samples, held", [({"epochs": Range("int", 1, 2)}, 3, 2),
                                                   ({"lr": Range("lin", 0.5, 0.5), "epochs": Range("int", 1, 2)}, 3, 2),
                                                   ({"lr": Range("log", 0.1, 0.1)}, 2, 1)])
def test_more_samples_than_the_ranges_hold_are_refused_in_one_line(ranges, samples, held):
    """Before: the repeats were dropped, a sweep of fewer configurations than --samples asked for."""
    with pytest.raises(SweepError) as raised:
        configurations({}, ranges, samples=samples)
    assert f"the ranges hold only {held} distinct configuration(s)" in str(raised.value)
    assert "\n" not in str(raised.value)


def test_too_few_distinct_float_draws_are_refused_not_tabled():
    """A float range rounded to 3 digits holds few values (0.1 to 0.102: 0.1, 0.101, 0.102 and a few more)."""
    with pytest.raises(SweepError, match=r"--samples 50: .* draws of the ranges gave only \d+ distinct"):
        configurations({}, {"lr": Range("lin", 0.1, 0.102)}, samples=50)


def test_the_draws_do_not_depend_on_the_order_of_the_ranges():
    """Before: each draw took the ranges in the order of their flags: ``--grid lr=.. --grid momentum=..`` drew
    other configurations than the flags swapped."""
    lr, momentum = Range("log", 1e-3, 1e-1), Range("lin", 0.0, 0.9)
    one = configurations({}, {"lr": lr, "momentum": momentum}, samples=3, sample_seed=2)
    other = configurations({}, {"momentum": momentum, "lr": lr}, samples=3, sample_seed=2)
    assert [json.dumps(c, sort_keys=True) for c in one] == [json.dumps(c, sort_keys=True) for c in other]


def test_a_cli_sweep_asking_more_samples_than_an_int_range_holds_is_refused(tiny_store_path, tmp_path, capsys):
    out = tmp_path / "sw"
    assert main(_argv(tiny_store_path, out, "--grid", "epochs=int:1:2", "--samples", "3")) == 2
    assert "--samples 3: the ranges hold only 2 distinct configuration(s) (epochs=int:1:2)" in _err_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("flags", [
    (["--grid", "lr=0.1,0.01", "--grid", "l2_normalize=true"], ["--grid", "l2_normalize=true", "--grid", "lr=0.1,0.01"]),
    (["--grid", "lr=log:1e-3:1e-1", "--grid", "momentum=lin:0:0.9", "--samples", "2"],
     ["--grid", "momentum=lin:0:0.9", "--grid", "lr=log:1e-3:1e-1", "--samples", "2"]),
])
def test_a_sweep_resumed_with_its_grid_flags_in_another_order_finds_its_trials(tiny_store_path, tmp_path, capsys,
                                                                              flags):
    """Before: the names followed the flags (``l2_normalize=True,lr=0.1`` vs ``lr=0.1,l2_normalize=True``), and
    the draws too: the rerun trained every configuration again beside the finished ones."""
    out = tmp_path / "sw"
    assert main(_argv(tiny_store_path, out, *flags[0])) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(_argv(tiny_store_path, out, *flags[1])) == 0
    again = json.loads(capsys.readouterr().out)
    assert first["trained"] == 2 and again["trained"] == 0 and again["rows"] == first["rows"]
    assert all(r["config"].startswith("lr=") for r in first["rows"])  # training fields first, sorted
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and not p.is_symlink()) == sorted(
        r["config"] for r in first["rows"])


def test_a_configuration_an_earlier_version_named_by_flag_order_is_refused_naming_the_rename(tiny_store_path,
                                                                                            tmp_path, capsys):
    """A sweep directory written when names followed the flags: rerun, it would train every trial again beside
    the old ones; refused with the ``mv`` that resumes it (a run's ``out`` may change on a resume)."""
    out = tmp_path / "sw"
    assert main(_argv(tiny_store_path, out, "--grid", "l2_normalize=true", "--grid", "lr=0.1")) == 0
    capsys.readouterr()
    (out / "lr=0.1,l2_normalize=True").rename(out / "l2_normalize=True,lr=0.1")  # as the earlier version named it
    described = json.loads((out / "sweep.json").read_text())
    for t in described["trials"]:
        t["config"] = "l2_normalize=True,lr=0.1"
    (out / "sweep.json").write_text(json.dumps(described))
    assert main(_argv(tiny_store_path, out, "--grid", "l2_normalize=true", "--grid", "lr=0.1")) == 2
    line = _err_line(capsys)
    assert f"mv {out / 'l2_normalize=True,lr=0.1'} {out / 'lr=0.1,l2_normalize=True'}" in line, line
    assert not (out / "lr=0.1,l2_normalize=True").exists()
    (out / "l2_normalize=True,lr=0.1").rename(out / "lr=0.1,l2_normalize=True")
    assert main(_argv(tiny_store_path, out, "--grid", "l2_normalize=true", "--grid", "lr=0.1")) == 0
    assert json.loads(capsys.readouterr().out)["trained"] == 0


@pytest.mark.parametrize("metric", ["val_accuracy", "val_logloss"])
def test_a_validation_metric_without_a_validation_split_is_refused_before_anything_trains(tiny_store_path, tmp_path,
                                                                                          metric):
    """Before: every trial trained, and the sweep ended with no best configuration, without a word."""
    out = tmp_path / "sw"
    with pytest.raises(SweepError) as raised:
        heads.sweep(_base(tiny_store_path, val_split=None), {"lr": [0.1, 0.01]}, seeds=[0], out=out, metric=metric)
    message = str(raised.value)
    assert f"--metric {metric} needs a validation split" in message and "--metric loss" in message, message
    assert "\n" not in message and not out.exists()
    result = heads.sweep(_base(tiny_store_path, val_split=None), {"lr": [0.1, 0.01]}, seeds=[0], out=out,
                         metric="loss")
    assert result.best is not None and result.best["metric"] == "loss"


@pytest.mark.parametrize("given", ["lgo:1e-3:1e-1", "log:1e-3", Range("lgo", 1e-3, 1e-1)])
def test_a_python_range_of_an_unknown_kind_is_refused_not_drawn_uniformly(tiny_store_path, tmp_path, given):
    """Before: ``ranges={"lr": "lgo:1e-3:1e-1"}`` (a typo of log) drew lr uniformly, as any kind but int and log
    did; ``"log:1e-3"`` was a bare ``not enough values to unpack``."""
    out = tmp_path / "sw"
    with pytest.raises(SweepError, match="a range is KIND:LOW:HIGH with KIND one of log, lin, int"):
        heads.sweep(_base(tiny_store_path), ranges={"lr": given}, samples=2, seeds=[0], out=out)
    assert not out.exists()


@pytest.mark.parametrize("samples", [2.5, True])
def test_a_python_samples_that_is_no_whole_number_is_refused_naming_it(samples):
    """Before: ``samples=2.5`` was a bare ``'float' object cannot be interpreted as an integer``, True one draw."""
    with pytest.raises(SweepError, match=rf"--samples must be an integer >= 0, got {samples!r}"):
        configurations({}, {"lr": Range("log", 1e-3, 1e-1)}, samples=samples)


def test_a_configuration_name_too_long_for_a_directory_is_refused_before_anything_trains(tiny_store_path, tmp_path):
    """Before: the short configuration trained, then the long one failed at its mkdir (``File name too long``)."""
    out = tmp_path / "sw"
    base = _base(tiny_store_path, head="embedding_mlp")
    with pytest.raises(SweepError, match=r"directory name is 266 bytes, more than a file name may have \(255\)"):
        heads.sweep(base, {"hidden": [[8], [8] * 130]}, seeds=[0], out=out)
    assert not out.exists()


def _three_split_store(path: Path) -> Path:
    """48 clips: splits train, val and val2 of 16 each, one embedding set with class-dependent values."""
    from featurestore import ClipRecord, Manifest
    from featurestore.store import create_store
    from tests.heads._store import CLASSES, SEGMENTS, provenance

    clips = [ClipRecord(f"c{i}", label=CLASSES[i % 4], splits=frozenset({("train", "val", "val2")[i // 16]}))
             for i in range(48)]
    store = create_store(path, Manifest("three", list(CLASSES), clips))
    labels = np.arange(48) % 4
    data = np.random.default_rng(0).normal(size=(48, SEGMENTS, 16)) + labels[:, None, None]
    store.create_feature_set(FEATURE, SEGMENTS, (16,), provenance(FEATURE + "@openai", "video"), chunk_clips=16)
    store.write_rows(FEATURE, 0, data.astype(np.float16))
    store.close()
    return path


def test_a_validation_metric_over_a_swept_validation_split_is_refused(tmp_path):
    """Before: each configuration was scored on its own validation split and 'best' was the one validated on
    the easier clips, exit 0; the training loss does not read the split, so ``metric="loss"`` still sweeps it."""
    store, out = _three_split_store(tmp_path / "s.zarr"), tmp_path / "sw"
    with pytest.raises(SweepError, match=r"--metric val_accuracy compares configurations validated on different "
                                         r"splits \(val, val2\): sweep one --val-split at a time"):
        heads.sweep(_base(store), {"val_split": ["val", "val2"]}, seeds=[0], out=out)
    assert not (out / "sweep.json").exists()
    assert heads.sweep(_base(store), {"val_split": ["val", "val2"]}, seeds=[0], out=out, metric="loss").best
