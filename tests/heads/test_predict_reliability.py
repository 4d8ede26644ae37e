"""``heads predict`` held to the store's promises, and the ``heads`` command line's error mapping.

Faults are real: a ``heads predict`` process killed with SIGKILL mid-run (``HEADS_TEST_SIGNAL_AT_DONE``
signals it after a store write), one stopped with SIGSTOP while it holds the writer lock and a
second predict (or extraction's lock) tries the store, a NaN written into one clip's stored features,
a real ``RLIMIT_FSIZE`` (SIGXFSZ ignored, so writes fail with EFBIG as on a full disk), a directory
given as a recipe, and a head whose forward pass fails inside torch.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import heads
from featurestore.store import open_store
from featurestore.store.lock import StoreLockedError, writer_lock
from heads._registry import _HEADS, Head, register_head
from heads.cli import main
from heads.config import TrainConfig

from tests import warm_child
from tests.heads._store import N_CLIPS, build_store
from tests.warm_child import file_size_limit

CLIP3 = ["clip/RN50x4", "clip/RN101", "clip/ViT-B-32"]
HOOK = "HEADS_TEST_SIGNAL_AT_DONE"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_store_path):
    """A late-fusion run (c04) and a zero-shot run (c03), trained on the shared tiny store."""
    out = tmp_path_factory.mktemp("predict_rel")
    with open_store(tiny_store_path) as store:
        heads.train(TrainConfig(head="late_fusion", features=CLIP3, train_split="train", val_split="val",
                                out=str(out / "c04"), epochs=1, batch_size=16, progress=False), store)
        heads.train(TrainConfig(head="zero_shot", features=["clip/ViT-B-32"], train_split="train", val_split="val",
                                head_config={"class_features": "cliptext/ViT-B-32"}, out=str(out / "c03"),
                                progress=False), store)
    return out


def _predict_cmd(store: Path, run: Path, *extra: str) -> list[str]:
    """``python``'s arguments for ``heads predict`` (``[2:]``: the command line's)."""
    return ["-m", "heads", "predict", "--store", str(store), "--run", str(run), "--name", "p",
            "--device", "cpu", "--batch-size", "8", "--flush-clips", "8", "-q", *extra]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != HOOK}
    return {**env, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", **extra}


def _done(store_path: Path, run: str = "p") -> np.ndarray:
    with open_store(store_path) as store:
        return store.prediction_done(run)


def _uninterrupted(store_path: Path, run_dir: Path, name: str) -> np.ndarray:
    heads.predict(str(store_path), run_dir, name=name, device="cpu", batch_size=8, progress=False)
    with open_store(store_path) as store:
        return store.get_predictions(name)


# ------------------------------------------------------------------ a killed predict resumes
def test_a_killed_predict_resumes_and_equals_an_uninterrupted_one(runs, tmp_path, capsys):
    store = build_store(tmp_path / "s.zarr")
    killed = warm_child.run(_predict_cmd(store, runs / "c04"), env=_env(**{HOOK: "KILL:16"}), timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    done = _done(store)
    assert done.sum() == 16 and done[:16].all()  # the written rows are done, nothing else is

    assert main(_predict_cmd(store, runs / "c04", "--json")[2:]) == 0  # the same command, rerun
    captured = capsys.readouterr()
    answer = json.loads(captured.out)
    assert answer["resumed"] == 16 and answer["clips"] == N_CLIPS - 16 and answer["errors"] == {}
    assert "16 clip(s) were done already (resumed)" in captured.err
    with open_store(store) as opened:
        resumed = opened.get_predictions("p")
    np.testing.assert_allclose(resumed, _uninterrupted(store, runs / "c04", "straight"), rtol=0, atol=1e-7)


# --------------------------------------------------------- two predicts into one store at once
def _wait_stopped(proc: warm_child.WarmChild, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T":
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the first predict never reached its stop point")


def test_two_predicts_into_one_store_at_once_one_is_refused_and_no_rows_mix(runs, tmp_path, capsys):
    store = build_store(tmp_path / "s.zarr")
    first = warm_child.start(_predict_cmd(store, runs / "c04"), env=_env(**{HOOK: "STOP:8"}),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_stopped(first)  # it holds the store's writer lock, 8 clips written
        # another run into the same name, from this process (flock excludes across processes)
        assert main(_predict_cmd(store, runs / "c03")[2:]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"heads predict: error: {store} is being written by another process (pid "
                                   f"{first.pid} ")
        with pytest.raises(StoreLockedError):  # the lock extraction takes: an extract is refused as well
            writer_lock(store).acquire()
    finally:
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err

    assert main(_predict_cmd(store, runs / "c03")[2:]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--overwrite" in lines[0], lines
    assert "pass overwrite=True" not in lines[0] and "differing: " in lines[0]
    with open_store(store) as opened:
        assert opened.prediction_runs()["p"]["head"] == "late_fusion" and opened.prediction_done("p").all()
        stored = opened.get_predictions("p")
    np.testing.assert_allclose(stored, _uninterrupted(store, runs / "c04", "straight"), rtol=0, atol=1e-7)


# ------------------------------------------------------------------------- NaN in a clip's features
def test_a_nan_feature_fails_its_clip_in_one_line_and_is_never_stored(runs, tmp_path, capsys):
    store = build_store(tmp_path / "s.zarr")
    with open_store(store, "a") as opened:
        block = opened.read_rows("clip/RN101", 0, 16)
        block[5, 2, 3] = np.nan
        opened.write_rows("clip/RN101", 0, block)  # chunk-aligned rewrite; the fingerprint is unchanged
        bad_id = opened.clip_ids[5]
    assert main(["predict", "--store", str(store), "--run", str(runs / "c04"), "--name", "n", "-q",
                 "--device", "cpu"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == (f"heads predict: error: 1 clip(s) not predicted (not marked done): {bad_id}: its "
                         f"'clip/RN101' features hold NaN or infinity")
    with open_store(store) as opened:
        done = opened.prediction_done("n")
        assert not done[5] and done.sum() == N_CLIPS - 1
        assert np.isfinite(opened.arrays.read("predictions/n/probs", 0, N_CLIPS, written=False)).all()
    assert main(["predict", "--store", str(store), "--run", str(runs / "c04"), "--name", "n", "-q",
                 "--device", "cpu"]) == 1  # a rerun tries that clip alone again, and fails it again
    assert f"{N_CLIPS - 1} clip(s) were done already (resumed)" in capsys.readouterr().err


def test_the_store_refuses_non_finite_probabilities(tmp_path):
    store = build_store(tmp_path / "s.zarr")
    with open_store(store, "a") as opened:
        opened.create_predictions("r", 4, {"head": "x"})
        probs = np.full((2, 4, 4), 0.25, np.float32)
        probs[1, 0, 0] = np.inf
        with pytest.raises(ValueError, match="1 clip\\(s\\) have non-finite probabilities"):
            opened.write_predictions("r", [0, 1], probs)
        assert not opened.prediction_done("r").any()


# ------------------------------------------------------------------------------- a full disk
def test_a_full_disk_during_predict_is_one_line_and_a_rerun_completes(runs, tmp_path):
    store = build_store(tmp_path / "s.zarr")
    limited = warm_child.run(_predict_cmd(store, runs / "c04"), env=_env(),
                             preexec_fn=partial(file_size_limit, 3000), timeout=300)  # metadata fits, a 4 KiB chunk does not
    lines = limited.stderr.strip().splitlines()
    assert limited.returncode == 1 and len(lines) == 1, limited.stderr
    assert lines[0] == (f"heads predict: error: {store}: file size limit exceeded while writing predictions/p "
                        f"(see 'ulimit -f'); raise the limit and rerun to resume")
    with open_store(store) as opened:
        assert opened.verify().ok
    assert main(_predict_cmd(store, runs / "c04")[2:]) == 0
    assert _done(store).all()


# ----------------------------------------------------------- the command line's error mapping
def test_a_directory_as_recipe_is_one_usage_line(tmp_path, capsys):
    assert main(["train", "--recipe", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("heads train: error: ") and str(tmp_path) in err and "\n" not in err


@dataclass
class _BrokenConfig:
    input_dims: list[int] = field(default_factory=lambda: [16])
    n_classes: int = 4


def test_a_diverging_train_is_one_line_exit_1(tmp_path, capsys):
    store = build_store(tmp_path / "s.zarr")
    recipe = tmp_path / "diverge.json"  # epoch 1 at lr 0.01, then lr x 1000: the loss becomes NaN in epoch 2
    recipe.write_text(json.dumps({"head": "late_fusion", "features": CLIP3, "train_split": "train", "val_split": "val",
                                  "epochs": 3, "batch_size": 16, "lr": 0.01, "lr_milestones": [1], "lr_gamma": 1000.0}))
    assert main(["train", "--recipe", str(recipe), "--store", str(store), "--out", str(tmp_path / "run"), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("heads train: error: ") and "epoch 2" in err[0]


class _BrokenInTorch(Head):
    """A head whose forward pass fails inside torch (mismatched matmul), as a real kernel failure would."""

    name = "test_broken_in_torch"
    config_class = _BrokenConfig
    default_batch_size = 16

    def __init__(self, cfg: _BrokenConfig):
        super().__init__(cfg)
        self.fc = nn.Linear(3, cfg.n_classes)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return self.fc(inputs[0].float())  # the inputs are 16 wide, the layer 3: torch raises RuntimeError


def test_a_torch_failure_is_not_reported_as_bad_input(tmp_path):
    store = build_store(tmp_path / "s.zarr")
    register_head(_BrokenInTorch)
    try:
        with pytest.raises(RuntimeError, match="cannot be multiplied"):  # a traceback, not 'error: ...' + exit 2
            main(["train", "--store", str(store), "--head", _BrokenInTorch.name, "--features", "clip/RN101",
                  "--train-split", "train", "--val-split", "val", "--out", str(tmp_path / "run"), "--epochs", "1", "--device", "cpu", "-q"])
    finally:
        _HEADS.pop(_BrokenInTorch.name, None)
