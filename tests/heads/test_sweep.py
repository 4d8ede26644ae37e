"""``heads sweep``: run directories, the mean +- std table, the best configuration, resuming after a real kill."""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from heads.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["lr=0.1,l2_normalize=True", "lr=0.1,l2_normalize=False", "lr=0.01,l2_normalize=True",
           "lr=0.01,l2_normalize=False"]


def _args(store: Path, out: Path, epochs: int = 2, *extra: str) -> list[str]:
    return ["sweep", "--store", str(store), "--head", "linear", "--features", "clip/RN101", "--train-split", "train",
            "--val-split", "val", "--epochs", str(epochs), "--batch-size", "16", "--grid", "lr=0.1,0.01",
            "--grid", "l2_normalize=true,false", "--seeds", "0,1", "--out", str(out), "-q", *extra]


def _best_record(run: Path) -> dict:
    state = json.loads((run / "state.json").read_text())
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in lines if r["epoch"] == state["best_epoch"])


def _run_files(out: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(out.glob("*/seed_*/**/*")) if p.is_file()}


def _same_runs(a: Path, b: Path, context: object = None) -> None:
    """Every trial of sweep ``a`` has the weights, checkpoint and metrics (timings aside) of ``b``'s, within the
    tolerance of stacked trials (see docs/heads.md). ``context`` (e.g. how a run was killed) goes into
    every failure's message, with the values that differ."""
    for config in CONFIGS:
        for seed in (0, 1):
            ra, rb = a / config / f"seed_{seed}", b / config / f"seed_{seed}"
            for name in ["best.safetensors", *sorted(p.name for p in (rb / "ckpt").iterdir())]:
                fa, fb = (ra / name, rb / name) if name == "best.safetensors" else (ra / "ckpt" / name, rb / "ckpt" / name)
                wa, wb = load_file(fa), load_file(fb)
                assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6) for k in wa), (
                    config, seed, name, {k: float((wa[k] - wb[k]).abs().max()) for k in wa if k in wb}, context)
            strip = lambda run: [{k: v for k, v in json.loads(x).items() if k != "seconds"}  # noqa: E731
                                 for x in (run / "metrics.jsonl").read_text().splitlines()]
            for x, y in zip(strip(ra), strip(rb), strict=True):
                assert x["val_accuracy"] == y["val_accuracy"] and x["lr"] == y["lr"], (config, seed, x, y, context)
                assert all(x[k] == pytest.approx(y[k], abs=1e-5) for k in ("loss", "val_logloss")), (
                    config, seed, x, y, context)


def test_sweep_trains_every_trial_and_tables_their_metrics(tiny_store_path, tmp_path, capsys):
    out = tmp_path / "sw"
    assert main(_args(tiny_store_path, out, 2, "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["trials"] == 8 and summary["trained"] == 8
    rows = {r["config"]: r for r in summary["rows"]}
    assert list(rows) == CONFIGS
    for config in CONFIGS:
        records = [_best_record(out / config / f"seed_{s}") for s in (0, 1)]
        for metric in ("val_accuracy", "val_logloss", "loss"):
            values = [r[metric] for r in records]
            assert rows[config][f"{metric}_mean"] == pytest.approx(np.mean(values), abs=1e-12)
            assert rows[config][f"{metric}_std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    expected = max(CONFIGS, key=lambda c: (rows[c]["val_accuracy_mean"], -rows[c]["val_logloss_mean"]))
    assert summary["best"]["config"] == expected
    assert os.readlink(out / "best") == expected and (out / "best" / "seed_0" / "best.safetensors").is_file()
    assert json.loads((out / "best.json").read_text())["config"] == expected
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("config,l2_normalize,lr,n_seeds,val_accuracy_mean")
    # a trial is exactly a lone `heads train` of its config and seed
    lone = tmp_path / "lone"
    assert main(["train", "--store", str(tiny_store_path), "--head", "linear", "--features", "clip/RN101",
                 "--train-split", "train", "--val-split", "val", "--epochs", "2", "--batch-size", "16", "--lr", "0.01",
                 "--set", "l2_normalize=true", "--seed", "1", "--out", str(lone), "-q"]) == 0
    a, b = load_file(lone / "best.safetensors"), load_file(out / CONFIGS[2] / "seed_1" / "best.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)  # stacked: float tolerance
    assert _best_record(lone)["val_logloss"] == pytest.approx(_best_record(out / CONFIGS[2] / "seed_1")["val_logloss"],
                                                              abs=1e-5)
    # a rerun trains nothing and touches no run file, and prints the same table
    before = _run_files(out)
    capsys.readouterr()
    assert main(_args(tiny_store_path, out, 2)) == 0
    captured = capsys.readouterr()
    assert "8 trial(s), 0 trained now" in captured.err and "| " + expected + " (best) |" in captured.out
    assert _run_files(out) == before
    assert not list(tmp_path.rglob("*.lock"))  # the sweep's and every trial's lock file are gone on a clean exit


def _committed(out: Path) -> list[int]:
    """The last committed epoch of every trial that has one (a state.json read while it may be replaced)."""
    return list(_committed_by_run(out).values())


def _committed_by_run(out: Path) -> dict[str, int]:
    epochs = {}
    for path in out.glob("*/seed_*/state.json"):
        with contextlib.suppress(OSError, ValueError):
            epochs[str(path.parent)] = json.loads(path.read_text())["epoch"]
    return epochs


def _stacked_calls(monkeypatch) -> list[list[tuple[str, int]]]:
    """Every stacked group `heads.sweep` trains from now on, as (run directory, committed epoch) per trial."""
    import heads._stacked as stacked

    calls, original = [], stacked.train_stacked

    def recording(cfgs, shared, **kwargs):
        calls.append([(c.out, _committed_by_run(Path(c.out).parents[1]).get(c.out, 0)) for c in cfgs])
        return original(cfgs, shared, **kwargs)

    monkeypatch.setattr(stacked, "train_stacked", recording)
    return calls


def test_a_sweep_killed_at_a_random_point_resumes_to_the_uninterrupted_result(tiny_store_path, tmp_path, monkeypatch):
    """SIGKILL once a random number of trial-epochs are committed (the 8 trials train as two stacked groups of 4,
    one per l2_normalize value, and a group commits its trials one by one, so the kill often lands with a
    group's trials at different epochs, e.g. [2, 2, 2, 3]), rerun: every trial and ``best`` equal the
    uninterrupted sweep's (within the stacked tolerance). The rerun resumes them stacked: the unfinished
    trials of a group at the same committed epoch train as one group again (a trial alone at its epoch
    resumes through `heads.train`)."""
    epochs = 6
    seed = random.randrange(2**32)
    # before the last epoch's commits: they land within a few ms of each other, so a target among them
    # could be passed between two polls and the kill come after every trial-epoch was committed
    target = random.Random(seed).randrange(1, 8 * epochs - 7)
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "heads", *_args(tiny_store_path, killed, epochs)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if sum(_committed(killed)) >= target:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        proc.kill()
        proc.wait()
    committed = _committed(killed)
    assert proc.returncode == -signal.SIGKILL, f"the sweep ended before {target} trial-epochs (seed {seed})"
    assert sum(committed) < 8 * epochs, (seed, committed)
    at_kill = _committed_by_run(killed)
    groups: dict[tuple[str, int], set[str]] = {}
    for config in CONFIGS:
        for s in (0, 1):
            run = str(killed / config / f"seed_{s}")
            if at_kill.get(run, 0) < epochs:
                groups.setdefault((config.split(",")[1], at_kill.get(run, 0)), set()).add(run)
    calls = _stacked_calls(monkeypatch)
    assert main(_args(tiny_store_path, killed, epochs)) == 0
    assert sorted(sorted(run for run, _ in call) for call in calls) == sorted(
        sorted(runs) for runs in groups.values() if len(runs) > 1), (seed, at_kill)
    assert all(len({epoch for _, epoch in call}) == 1 for call in calls)
    assert main(_args(tiny_store_path, whole, epochs)) == 0
    _same_runs(killed, whole, {"kill seed": seed, "trial-epochs at the kill": at_kill})
    assert os.readlink(killed / "best") == os.readlink(whole / "best"), (seed, committed)


@pytest.mark.parametrize("grid, expected", [
    (["lr=0.1,abc"], "--grid lr: expected a valid number"),
    (["lr=0.1,-1"], "--grid lr: expected > 0, got '-1'"),
    (["hidden=[32],[64]"], "--grid hidden: neither a training field nor a field of head 'linear'"),
    (["seed=1,2"], "--grid seed: cannot be swept"),
    (["lr"], "--grid expects KEY=V1,V2,... or KEY=log:LOW:HIGH"),
    (["lr=log:0:1"], "--grid lr=log:0:1: expected LOW <= HIGH and LOW > 0"),
    (["batch_size=lin:0.5:8"], "--grid batch_size: expected a valid integer"),
    (["lr=log:1e-3:1e-1"], "need --samples N"),
])
def test_bad_grid_values_are_one_line_before_any_training(tiny_store_path, tmp_path, capsys, grid, expected):
    out = tmp_path / "bad"
    argv = ["sweep", "--store", str(tiny_store_path), "--head", "linear", "--features", "clip/RN101", "--out", str(out),
            "--epochs", "1", "-q"]
    for item in grid:
        argv += ["--grid", item]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("heads sweep: error: ") and expected in err and err.count("\n") == 1, err
    assert not out.exists()


def test_a_best_that_is_not_the_sweeps_link_is_one_line_before_any_training(tiny_store_path, tmp_path, capsys):
    out = tmp_path / "sw"
    (out / "best").mkdir(parents=True)  # a directory of the user's: the link could replace it only at the end
    argv = ["sweep", "--store", str(tiny_store_path), "--head", "linear", "--features", "clip/RN101", "--out", str(out),
            "--epochs", "1", "--grid", "lr=0.1", "-q"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("heads sweep: error: ") and "is not the sweep's 'best' link (a directory)" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["best"]  # nothing trained, nothing written


def test_random_search_draws_the_same_configurations_again(tiny_store_path, tmp_path, capsys):
    out = tmp_path / "rs"
    argv = ["sweep", "--store", str(tiny_store_path), "--head", "embedding_mlp", "--features", "clip/RN101",
            "--train-split", "train", "--val-split", "val", "--epochs", "1", "--batch-size", "16",
            "--grid", "lr=log:1e-3:1e-1", "--grid", "hidden=[8],[16]", "--samples", "2", "--seeds", "3",
            "--metric", "val_logloss", "--out", str(out), "-q", "--json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["trials"] == 4 and first["trained"] == 4
    values = [r["values"] for r in first["rows"]]
    assert {json.dumps(v["hidden"]) for v in values} == {"[8]", "[16]"}
    assert all(1e-3 <= v["lr"] <= 1e-1 and float(f"{v['lr']:.3g}") == v["lr"] for v in values)
    assert all((out / r["config"] / "seed_3" / "best.safetensors").is_file() for r in first["rows"])
    assert first["best"]["config"] == min(first["rows"], key=lambda r: r["val_logloss_mean"])["config"]
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["trained"] == 0 and again["rows"] == first["rows"]


def test_trials_share_one_read_of_the_store_and_train_as_if_alone(tiny_store_path, tmp_path):
    """An embedding MLP (dropout, batchnorm: the RNG matters) swept with shared reads (one trial after
    another: stacked trials are equal within float tolerance, tests/heads/test_sweep_stacked.py) ends bit for
    bit where the same sweep reading the store per trial and epoch ends, while reading each stored row once."""
    import heads
    from featurestore.store import open_store
    from heads.config import TrainConfig

    base = TrainConfig(head="embedding_mlp", features=["clip/RN101", "clip/ViT-B-32"], train_split="train",
                       val_split="val", epochs=2, batch_size=16, head_config={"dropout": 0.3}, progress=False)
    grid = {"lr": [0.1, 0.01], "hidden": [[8], [16]]}
    reads = {}
    for share in (True, False):
        with open_store(tiny_store_path) as store:
            calls = []
            original = store.read_rows
            store.read_rows = lambda name, start, stop, **kw: calls.append(name) or original(name, start, stop, **kw)
            out = tmp_path / f"share_{share}"
            result = heads.sweep(base, grid, seeds=[0, 1], out=out, store=store, share_reads=share, stack=False)
            reads[share] = len(calls)
        assert result.trained == 8
    shared, alone = tmp_path / "share_True", tmp_path / "share_False"
    for config in ("lr=0.1,hidden=8", "lr=0.01,hidden=16"):
        for seed in (0, 1):
            a = load_file(shared / config / f"seed_{seed}" / "best.safetensors")
            b = load_file(alone / config / f"seed_{seed}" / "best.safetensors")
            assert all(bool((a[k] == b[k]).all()) for k in a), (config, seed)
    assert (shared / "results.csv").read_text() == (alone / "results.csv").read_text()
    # 64 clips in chunks of 16, train and val rows in every chunk: one pass is 2 sets x 2 splits x 4 blocks;
    # shared, the whole sweep makes one pass; alone, every trial makes one per epoch (8 trials x 2 epochs)
    one_pass = 2 * 2 * 4
    assert reads[True] == one_pass and reads[False] == 8 * 2 * one_pass


def test_sweep_help_shows_the_paper_shaped_example(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["sweep", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "--head late_fusion" in out and "--grid lr=0.1,0.01,0.001 --grid hidden=128,256,512 --seeds 0,1,2" in out
    assert all(flag in out for flag in ("--train-split", "--epochs", "--batch-size", "--set", "--samples", "--metric"))


def test_stacked_linear_trials_equal_lone_trials_within_float_tolerance(tiny_store_path, tmp_path, monkeypatch):
    """16 trials differing in lr, weight decay and seed train as two stacked models (one per l2_normalize value,
    a head field: another model); each ends where it ends
    trained alone (--no-stack: bit for bit a lone `heads train`) within float tolerance."""
    base = ["--grid", "weight_decay=0,0.01"]
    stacked, alone = tmp_path / "stacked", tmp_path / "alone"
    assert main(_args(tiny_store_path, stacked, 2, *base)) == 0
    assert main(_args(tiny_store_path, alone, 2, *base, "--no-stack")) == 0
    # one more epoch: the trials resume stacked, each from its checkpoint (momentum buffers included)
    calls = _stacked_calls(monkeypatch)
    assert main(_args(tiny_store_path, stacked, 3, *base)) == 0
    assert sorted(len(call) for call in calls) == [8, 8] and {e for call in calls for _, e in call} == {2}
    assert main(_args(tiny_store_path, alone, 3, *base, "--no-stack")) == 0
    runs = sorted(p.relative_to(stacked) for p in stacked.glob("lr=*/seed_*"))
    assert len(runs) == 2 * 2 * 2 * 2
    for run in runs:
        for name in ("best.safetensors", "ckpt/epoch_003.safetensors", "ckpt/epoch_003.optim.safetensors"):
            a, b = load_file(stacked / run / name), load_file(alone / run / name)
            assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a), run
        ma = [json.loads(x) for x in (stacked / run / "metrics.jsonl").read_text().splitlines()]
        mb = [json.loads(x) for x in (alone / run / "metrics.jsonl").read_text().splitlines()]
        for x, y in zip(ma, mb, strict=True):
            assert x["val_accuracy"] == y["val_accuracy"] and x["lr"] == y["lr"], run
            assert x["loss"] == pytest.approx(y["loss"], abs=1e-5) and x["val_logloss"] == pytest.approx(
                y["val_logloss"], abs=1e-5), run


def test_a_nan_in_the_shared_rows_stops_a_stacked_sweep_in_one_line_naming_the_clip(tmp_path, capsys):
    """The stacked trials check the shared rows once instead of every batch: a NaN must still be refused."""
    from tests.heads._store import build_store
    from tests.heads.test_train_reliability import TRAIN_CLIP, TRAIN_ROW, poison

    store = build_store(tmp_path / "s.zarr")
    poison(store, "clip/RN101", TRAIN_ROW)
    out = tmp_path / "sw"
    assert main(_args(store, out, 1)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("heads sweep: error: feature set 'clip/RN101'") and TRAIN_CLIP in err[0]
    assert not list(out.glob("*/seed_*/best.safetensors"))
