"""``fusion ... --predictions MINE``: runs read from a shared read-only store and a prediction store of one's own.

The shared store's folder is a real read-only bind mount (root only; skipped elsewhere). The shared
store holds the audio runs; the video and CLIP runs are in MINE, copied there through the featurestore
API (fusion's tests never run heads). Evaluating and submitting the paper's E02 on both
must give what the one writable store holding every run gives, byte for byte, and change nothing in
the shared store; a MINE of another index, or a run in both stores, is one line (exit 2).
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from featurestore import open_store
from featurestore.store.shared import open_prediction_store
from fusion.cli import main

from tests.fusion.conftest import build_tiny_store

MINE_RUNS = ("V01", "V02", "C04")


def _mount_read_only(source: Path, target: Path) -> None:
    target.mkdir(exist_ok=True)
    bound = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True, text=True)
    if bound.returncode != 0:
        pytest.skip(f"cannot bind-mount a read-only store here (needs root): {bound.stderr.strip()}")
    remounted = subprocess.run(["mount", "-o", "remount,ro,bind", str(target)], capture_output=True, text=True)
    if remounted.returncode != 0:
        subprocess.run(["umount", "-l", str(target)], check=False)
        pytest.skip(f"cannot remount the bind mount read-only: {remounted.stderr.strip()}")


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def _copy_runs(source, target, runs) -> None:
    for run in runs:
        attrs = source.prediction_runs()[run]
        probs = source.get_predictions(run)
        target.create_predictions(run, probs.shape[1], {k: v for k, v in attrs.items() if k != "runtime"})
        target.write_predictions(run, np.arange(len(probs)), probs)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """``whole.zarr`` (every run, writable), ``ro/shared.zarr`` (the audio runs, read-only mount) and
    ``mine.zarr`` (the video and CLIP runs, a prediction store of the shared one)."""
    root = tmp_path_factory.mktemp("fusion_ro")
    whole = build_tiny_store(root / "whole.zarr")
    (root / "src").mkdir()
    shutil.copytree(whole, root / "src" / "shared.zarr")
    with open_store(root / "src" / "shared.zarr", "a") as shared:
        for run in MINE_RUNS:
            shared.delete_predictions(run)
    with open_store(whole) as source, open_store(root / "src" / "shared.zarr") as shared:
        with open_prediction_store(root / "mine.zarr", shared, mode="a") as mine:
            _copy_runs(source, mine, MINE_RUNS)
    _mount_read_only(root / "src", root / "ro")
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root / "ro")], check=False)


@pytest.fixture()
def recipe(tmp_path, paper_recipe_dict) -> Path:
    path = tmp_path / "e02.json"
    path.write_text(json.dumps({**paper_recipe_dict, "eval_split": "fold1_evaluate"}))
    return path


def test_evaluate_and_submit_read_both_stores_as_one_writable_store(stores, recipe, tmp_path, capsys):
    both = ["--store", str(stores / "ro" / "shared.zarr"), "--predictions", str(stores / "mine.zarr")]
    whole = ["--store", str(stores / "whole.zarr")]
    before = _snapshot(stores / "ro")
    answers = []
    for store in (both, whole):
        assert main(["evaluate", *store, "--recipe", str(recipe), "--json"]) == 0
        answers.append(json.loads(capsys.readouterr().out))
    assert answers[0] == answers[1]
    for name, store in (("both", both), ("whole", whole)):
        assert main(["submit", *store, "--recipe", str(recipe), "--split", "fold1_test",
                     "--out", str(tmp_path / f"{name}.csv")]) == 0
    assert (tmp_path / "both.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()
    out = capsys.readouterr().out
    assert main(["runs", *both]) == 0
    assert sorted(line.split(":")[0] for line in capsys.readouterr().out.splitlines()
                  if not line.startswith("WARNING")) == ["A01", "A02", "C04", "V01", "V02"]
    assert "RANDOM" in out  # V01/V02's random-weights warning comes from MINE's runs
    assert _snapshot(stores / "ro") == before


def test_a_run_in_both_stores_is_refused_in_one_line(stores, recipe, tmp_path, capsys):
    with open_store(stores / "whole.zarr") as whole, open_store(stores / "ro" / "shared.zarr") as shared:
        with open_prediction_store(tmp_path / "mine.zarr", shared, mode="a") as mine:
            _copy_runs(whole, mine, ["A01", "C04"])  # A01 is in the shared store as well
    assert main(["evaluate", "--store", str(stores / "ro" / "shared.zarr"), "--predictions",
                 str(tmp_path / "mine.zarr"), "--recipe", str(recipe)]) == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("fusion evaluate: error: prediction run(s) A01 are in both ") and "--name" in line


def test_a_prediction_store_with_other_classes_is_refused_in_one_line(stores, recipe, tmp_path, capsys):
    mine = tmp_path / "mine.zarr"
    shutil.copytree(stores / "mine.zarr", mine)
    with open_store(mine, "a") as opened:  # same clip ids, classes renamed
        opened.arrays.set_attrs("", {"classes": [f"c{i}" for i in range(len(opened.classes))]})
    assert main(["submit", "--store", str(stores / "ro" / "shared.zarr"), "--predictions", str(mine),
                 "--recipe", str(recipe), "--out", str(tmp_path / "s.csv")]) == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"fusion submit: error: prediction store {mine} does not hold the index of ")
    assert "classes ['c0'," in line and not (tmp_path / "s.csv").exists()
