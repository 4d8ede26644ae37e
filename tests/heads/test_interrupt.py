"""Ctrl-C in ``heads``: a real SIGINT sent to a real ``heads train`` and ``heads predict`` mid-run.

Each is one line on stderr saying what was kept and how to resume, exit code 130, no traceback;
rerunning the same command then resumes from what was kept.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import heads
from featurestore.store import open_store
from heads.cli import main
from heads.config import TrainConfig

from tests import warm_child
from tests.heads._store import build_store

HOOK = "HEADS_TEST_SIGNAL_AT_DONE"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != HOOK}
    return {**env, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", **extra}


def test_ctrl_c_in_heads_train_is_one_line_naming_the_epochs_kept(tiny_store_path, tmp_path, sigint_as_in_a_terminal):
    run = tmp_path / "run"
    command = ["-m", "heads", "train", "--store", str(tiny_store_path), "--head", "embedding_mlp",
               "--features", "clip/ViT-B-32", "--train-split", "train", "--val-split", "val", "--out", str(run),
               "--epochs", "100000", "--batch-size", "16", "--device", "cpu", "-q"]
    proc = warm_child.start(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (run / "state.json").exists():  # the first epoch is committed
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no epoch was committed in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    line, = err.strip().splitlines()  # one line, no traceback
    epoch = json.loads((run / "state.json").read_text())["epoch"]
    kept = "epoch 1" if epoch == 1 else f"epochs 1-{epoch}"
    assert line == f"heads train: interrupted; {kept} kept in {run}, rerun the same command to resume"


def test_ctrl_c_in_heads_predict_is_one_line_and_the_rerun_resumes(tiny_store_path, tmp_path, capsys, sigint_as_in_a_terminal):
    with open_store(tiny_store_path) as store:
        heads.train(TrainConfig(head="embedding_mlp", features=["clip/ViT-B-32"], train_split="train",
                                val_split="val", out=str(tmp_path / "m"), epochs=1, batch_size=16, progress=False),
                    store)
    store = build_store(tmp_path / "s.zarr")
    command = ["predict", "--store", str(store), "--run", str(tmp_path / "m"), "--name", "p", "--device", "cpu",
               "--batch-size", "8", "--flush-clips", "8", "-q"]
    # a real SIGINT, sent by the process to itself once 16 clips are written (the test hook)
    done = warm_child.run(["-m", "heads", *command], env=_env(**{HOOK: "INT:16"}), timeout=300)
    assert done.returncode == 130, done.stderr
    line, = done.stderr.strip().splitlines()
    assert line == (f"heads predict: interrupted; 16 clip(s) of predictions/p kept in {store}; rerun the same "
                    f"command to resume")
    assert not Path(f"{store}.lock").exists()
    assert main(command) == 0
    assert "16 clip(s) were done already (resumed)" in capsys.readouterr().err
    with open_store(store) as opened:
        assert opened.prediction_done("p").all()


@pytest.fixture(autouse=True)
def _no_hook(monkeypatch):
    monkeypatch.delenv(HOOK, raising=False)


SWALLOWING_TRAIN = """
import importlib, os, signal, sys, weakref
from heads.cli import main

training = importlib.import_module("heads.train")  # the module (``heads.train`` is also the function)
step, steps = training.train_step, []

def interrupted_in_a_finalizer(*args, **kwargs):
    steps.append(1)
    if len(steps) == 2:  # Ctrl-C arrives while a finalizer runs: Python reports it "ignored" and goes on
        thing = type("Thing", (), {})()
        weakref.finalize(thing, lambda: (os.kill(os.getpid(), signal.SIGINT), sum(range(10))))
        del thing
    return step(*args, **kwargs)

training.train_step = interrupted_in_a_finalizer
code = main(sys.argv[1:])
print("steps", len(steps), file=sys.stderr)
sys.exit(code)
"""


def test_ctrl_c_that_python_drops_in_a_finalizer_still_stops_heads_train(tiny_store_path, tmp_path,
                                                                         sigint_as_in_a_terminal):
    """Without ``featurestore._sigint.kept`` the run trained every epoch and exited 0."""
    run = tmp_path / "run"
    command = ["-c", SWALLOWING_TRAIN, "train", "--store", str(tiny_store_path), "--head", "embedding_mlp",
               "--features", "clip/ViT-B-32", "--train-split", "train", "--val-split", "val", "--out", str(run), "--epochs", "3",
               "--batch-size", "4", "--device", "cpu", "-q"]
    done = subprocess.run([sys.executable, *command], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 130, done.stderr
    line, count = done.stderr.strip().splitlines()  # the command's one line (then this test's count)
    assert line == f"heads train: interrupted; no epoch was finished, nothing kept in {run}; rerun the same command to start"
    assert count == "steps 2"  # it stopped right after the step it was interrupted in
