"""Ctrl-C in ``fusion``: a real SIGINT sent to a real ``fusion classify`` while it waits for a run's answer.

``fusion classify`` asks each run of the recipe through a ``python -m heads classify`` subprocess;
the SIGINT goes to the fusion process once that child exists (a point it stays at for seconds while
the child starts). One line on stderr, exit code 130, no traceback, no output file.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from featurestore import open_store

from tests.fusion.conftest import build_tiny_store


def _children(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []


def test_ctrl_c_in_fusion_classify_is_one_line_exit_130(tmp_path, sigint_as_in_a_terminal):
    store = build_tiny_store(tmp_path / "s.zarr")
    (tmp_path / "run").mkdir()  # the training run the prediction run records (heads is never reached)
    with open_store(store, "a") as opened:
        attrs = {k: v for k, v in opened.prediction_runs()["A01"].items() if k != "runtime"}
        probs = opened.get_predictions("A01")
        opened.create_predictions("X", probs.shape[1], {**attrs, "run_dir": str(tmp_path / "run")})
        opened.write_predictions("X", np.arange(len(probs)), probs)
    recipe = tmp_path / "r.json"
    recipe.write_text('{"name": "x", "families": {"audio": ["X"]}, "eval_split": "fold1_evaluate"}')
    (tmp_path / "new.wav").write_bytes(b"RIFF")
    out = tmp_path / "fused.csv"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fusion", "classify", "--store", str(store), "--recipe",
                             str(recipe), str(tmp_path / "new.wav"), "--device", "cpu", "--out", str(out), "-q"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _children(proc.pid):  # it waits for 'heads classify' now
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "fusion classify never asked heads"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    line, = err.strip().splitlines()
    assert line == f"fusion classify: interrupted; {out} is written whole or not at all, never half; rerun the same command"
    assert not out.exists()
