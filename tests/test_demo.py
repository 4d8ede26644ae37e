"""The README's main job, end to end, on a tiny demo dataset: every stage's output exists and parses."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import featurestore

REPO = Path(__file__).resolve().parent.parent

#: Minutes on 2 cores: deselected by a plain ``pytest``; ``pytest -m demo`` runs them (pyproject.toml).
pytestmark = pytest.mark.demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cmd = [sys.executable, str(REPO / "scripts" / "demo.py"), "--out", str(out), "--clips-per-class", "2",
           "--clips-per-location", "1", "--duration", "2", "--frames", "2", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_demo_says_plainly_that_weights_are_random(demo):
    out, stdout = demo
    assert "RANDOM" in stdout and "not how well the paper's system works" in stdout
    report = (out / "report" / "report.md").read_text()
    assert report.startswith("> **WARNING: RANDOM WEIGHTS.**")
    for row in ("| A01 |", "| V01 |", "| C04 |", "fused + eq. (1)", "fused + temperature"):
        assert row in report
    assert (out / "report" / "confusion.png").stat().st_size > 1000
    assert (out / "report" / "reliability.png").stat().st_size > 1000


def test_demo_store_holds_every_stage_and_verifies(demo):
    out, _ = demo
    with featurestore.open_store(out / "store.zarr") as store:
        assert store.verify().ok
        sets = store.feature_sets()
        assert {"logmel", "frames/64", "timm/regnetx_064", "clip/RN50x4", "clip/RN101", "clip/ViT-B-32"} <= set(sets)
        assert sets["clip/RN50x4"].feature_shape == (640,) and sets["logmel"].feature_shape == (256, 94)
        assert all(info.n_done == store.n_clips for info in sets.values())
        assert sets["timm/regnetx_064"].random_weights
        runs = store.prediction_runs()
        assert {"A01", "V01", "V01_frozen", "C04", "C03"} <= set(runs) and runs["V01"]["head"] == "frame_cnn"
        probs = store.get_predictions("C04")
        np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-4)


def test_demo_submission_is_a_dcase_file(demo):
    out, _ = demo
    with open(out / "submission.csv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    header, body = rows[0], rows[1:]
    assert header == ["filename", "scene_label", *featurestore.TAU_CLASSES]
    with featurestore.open_store(out / "store.zarr") as store:
        assert len(body) == len(store.select(split="fold1_test"))
    for row in body:
        probs = np.array(row[2:], dtype=float)
        assert row[0].startswith("audio/") and row[0].endswith(".wav")
        assert row[1] == featurestore.TAU_CLASSES[int(np.argmax(probs))]
        assert ((probs > 0) & (probs <= 1)).all()
