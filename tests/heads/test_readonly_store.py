"""``heads predict`` from a shared store this user cannot write: a real read-only bind mount.

The shared store's folder is bind-mounted read-only (``mount --bind`` then ``mount -o
remount,ro,bind``; root only, skipped elsewhere), so every write into it fails as it does on a lab's
read-only share: root's permissions do not help. Predicting into it is one line naming
``--predictions`` (exit 2) and leaves every byte there (no lock file either); predicting into a
prediction store of one's own (``--predictions MINE``) gives the probabilities the same run gives
in a writable copy, and ``fusion evaluate``/``submit`` reading both stores give that copy's answers.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import heads
from featurestore import ClipRecord, Manifest
from featurestore.store import create_store, open_store
from featurestore.store.shared import PREDICTIONS_FOR, open_prediction_store
from fusion.cli import main as fusion_main
from heads.cli import main
from heads.config import TrainConfig

from tests.heads._store import CLASSES, build_store


def _mount_read_only(source: Path, target: Path) -> None:
    """Bind-mount ``source`` at ``target`` read-only, or skip the test where mounting is not allowed."""
    target.mkdir(exist_ok=True)
    bound = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True, text=True)
    if bound.returncode != 0:
        pytest.skip(f"cannot bind-mount a read-only store here (needs root): {bound.stderr.strip()}")
    remounted = subprocess.run(["mount", "-o", "remount,ro,bind", str(target)], capture_output=True, text=True)
    if remounted.returncode != 0:
        subprocess.run(["umount", "-l", str(target)], check=False)
        pytest.skip(f"cannot remount the bind mount read-only: {remounted.stderr.strip()}")


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (None for a directory)."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """``ro/shared.zarr``: a store holding the zero-shot run ``base``, seen through a read-only mount of
    its folder; ``src`` is the writable folder below it; ``runs/m`` an MLP trained on it."""
    root = tmp_path_factory.mktemp("shared_ro")
    src = root / "src"
    src.mkdir()
    store = build_store(src / "shared.zarr")
    with open_store(store) as opened:
        heads.train(TrainConfig(head="embedding_mlp", features=["clip/ViT-B-32"], train_split="train",
                                val_split="val", out=str(root / "runs" / "m"), epochs=1, batch_size=16,
                                progress=False), opened)
        heads.train(TrainConfig(head="zero_shot", features=["clip/ViT-B-32"], train_split="train", val_split="val",
                                head_config={"class_features": "cliptext/ViT-B-32"}, out=str(root / "runs" / "base"),
                                progress=False), opened)
    heads.predict(str(store), root / "runs" / "base", device="cpu", progress=False)
    _mount_read_only(src, root / "ro")
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root / "ro")], check=False)


def _predict(store: Path, run: Path, *extra: str) -> list[str]:
    return ["predict", "--store", str(store), "--run", str(run), "--device", "cpu", "--batch-size", "8", "-q", *extra]


def test_predict_into_a_read_only_store_is_one_line_naming_the_option_and_writes_nothing(shared, capsys):
    ro = shared / "ro"
    before = _snapshot(ro)
    assert main(_predict(ro / "shared.zarr", shared / "runs" / "m")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"heads predict: error: cannot write predictions into {ro / 'shared.zarr'}: ")
    assert "read-only file system" in lines[0] and "--predictions MINE.zarr" in lines[0]
    assert _snapshot(ro) == before  # byte-identical, and no lock file was made beside the store


def test_a_read_only_store_in_a_writable_folder_gets_no_lock_file_either(shared, tmp_path, capsys):
    """Only the store directory is read-only: the lock file could be made beside it, but is not tried."""
    mounted = tmp_path / "shared.zarr"
    _mount_read_only(shared / "src" / "shared.zarr", mounted)
    try:
        before = _snapshot(tmp_path)
        assert main(_predict(mounted, shared / "runs" / "m")) == 2
        line, = capsys.readouterr().err.strip().splitlines()
        assert "read-only file system" in line and "--predictions" in line
        assert _snapshot(tmp_path) == before and not (tmp_path / "shared.zarr.lock").exists()
    finally:
        subprocess.run(["umount", "-l", str(mounted)], check=False)


def test_predictions_of_a_read_only_store_go_to_a_store_of_ones_own_and_fuse_as_in_a_writable_copy(
        shared, tmp_path, capsys):
    ro_store, run = shared / "ro" / "shared.zarr", shared / "runs" / "m"
    before = _snapshot(shared / "ro")
    mine = tmp_path / "mine.zarr"
    assert main(_predict(ro_store, run, "--predictions", str(mine), "--json")) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["clips"] == 64 and answer["predictions"] == str(mine)
    assert _snapshot(shared / "ro") == before  # the shared store is only read
    assert not Path(f"{mine}.lock").exists()  # the writer lock was taken (and released) on MINE

    copy = tmp_path / "copy.zarr"  # the same run predicted into a writable copy of the shared store
    shutil.copytree(shared / "src" / "shared.zarr", copy)
    assert main(_predict(copy, run)) == 0
    with open_store(mine) as own, open_store(copy) as writable, open_store(ro_store) as source:
        assert own.clip_ids == source.clip_ids and own.classes == source.classes
        assert list(own.labels) == list(source.labels) and own.splits() == source.splits()
        assert own.attrs[PREDICTIONS_FOR]["store"] == str(ro_store)
        assert list(own.prediction_runs()) == ["m"] and own.feature_sets() == {}
        np.testing.assert_array_equal(own.get_predictions("m"), writable.get_predictions("m"))

    recipe = tmp_path / "recipe.json"  # one run from each store
    recipe.write_text(json.dumps({"name": "ro", "families": {"zs": ["base"], "mlp": ["m"]}, "eval_split": "val"}))
    both = ["--store", str(ro_store), "--predictions", str(mine), "--recipe", str(recipe)]
    capsys.readouterr()
    assert fusion_main(["evaluate", *both, "--json"]) == 0
    read_both = json.loads(capsys.readouterr().out)
    assert fusion_main(["evaluate", "--store", str(copy), "--recipe", str(recipe), "--json"]) == 0
    assert read_both == json.loads(capsys.readouterr().out)
    assert fusion_main(["submit", *both, "--split", "val", "--out", str(tmp_path / "both.csv")]) == 0
    assert fusion_main(["submit", "--store", str(copy), "--recipe", str(recipe), "--split", "val",
                        "--out", str(tmp_path / "copy.csv")]) == 0
    assert (tmp_path / "both.csv").read_bytes() == (tmp_path / "copy.csv").read_bytes()
    assert _snapshot(shared / "ro") == before

    capsys.readouterr()  # the same command again: the run is resumed, nothing to do
    assert main(_predict(ro_store, run, "--predictions", str(mine))) == 0
    assert "64 clip(s) were done already (resumed)" in capsys.readouterr().err


def test_a_prediction_store_of_another_store_is_refused_in_one_line(shared, tmp_path, capsys):
    clips = [ClipRecord(f"other-{i}", label=CLASSES[i % 4], splits=frozenset({"val"})) for i in range(8)]
    create_store(tmp_path / "mine.zarr", Manifest("other", CLASSES, clips)).close()  # MINE of another store
    ro_store = shared / "ro" / "shared.zarr"
    assert main(_predict(ro_store, shared / "runs" / "m", "--predictions", str(tmp_path / "mine.zarr"))) == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"heads predict: error: prediction store {tmp_path / 'mine.zarr'} does not hold the "
                           f"index of {ro_store}: 8 clip ids against 64 (e.g. ")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"name": "ro", "families": {"zs": ["base"]}, "eval_split": "val"}))
    assert fusion_main(["evaluate", "--store", str(ro_store), "--predictions", str(tmp_path / "mine.zarr"),
                        "--recipe", str(recipe)]) == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("fusion evaluate: error: prediction store ") and "does not hold the index" in line


def test_a_prediction_store_made_before_the_shared_store_grew_gets_the_new_clips(shared, tmp_path, capsys):
    first = build_store(tmp_path / "first.zarr", n_clips=32)  # the shared store's first 32 clips
    with open_store(first) as opened:
        open_prediction_store(tmp_path / "mine.zarr", opened, mode="a").close()
    ro_store = shared / "ro" / "shared.zarr"
    assert main(_predict(ro_store, shared / "runs" / "m", "--predictions", str(tmp_path / "mine.zarr"))) == 0
    with open_store(tmp_path / "mine.zarr") as mine, open_store(ro_store) as source:
        assert mine.clip_ids == source.clip_ids and mine.prediction_done("m").all()
