"""Hostile names and half-filled runs: what the store refuses, and how it says so.

A run or feature-set name is a group path, so a part ``.`` or ``..`` must be refused by the name check
(zarr refused it only once writing, naming its own path); a prediction run's missing rows point to
``heads predict``, not to extraction.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from featurestore import MissingFeatureError, create_store, open_store
from featurestore.store.lock import lock_path

from tests.featurestore.test_store import DIM, FEAT, N_SEG, make_manifest, provenance


def _files(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its modification time: a refused call changes none of them."""
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    path = tmp_path / "s.zarr"
    create_store(path, make_manifest(6)).close()
    return path


@pytest.mark.parametrize("name", [".", "..", "a/.", "./a", "a/../b", "a//b", "a/"])
def test_dot_and_empty_name_parts_are_refused_before_anything_is_written(store_path, name):
    before = _files(store_path)
    with open_store(store_path, "a") as store:
        with pytest.raises(ValueError, match=f"invalid prediction run name {name!r}") as err:
            store.create_predictions(name, N_SEG, {"run_dir": "r"})
        assert "\n" not in str(err.value)
        with pytest.raises(ValueError, match=f"invalid feature set name {name!r}"):
            store.create_feature_set(name, N_SEG, (DIM,), provenance())
        assert store.prediction_runs() == {} and store.feature_sets() == {}
    assert _files(store_path) == before


def test_heads_predict_refuses_a_dot_name_before_the_lock_or_the_classes(store_path, tmp_path, capsys):
    from heads.cli import main

    before = _files(store_path)
    code = main(["predict", "--store", str(store_path), "--run", str(tmp_path / "run"), "--name", ".", "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "invalid prediction run name '.'" in err and "\n" not in err, err
    assert _files(store_path) == before
    assert not lock_path(store_path).exists()


def test_missing_prediction_rows_point_to_heads_predict(store_path):
    with open_store(store_path, "a") as store:
        store.create_predictions("part", N_SEG, {"run_dir": "r"})
        store.write_predictions("part", [0, 1], np.full((2, N_SEG, 10), 0.1, np.float32))
        with pytest.raises(MissingFeatureError, match="heads predict") as err:
            store.get_predictions("part")
        assert "prediction run" in str(err.value) and "extraction" not in str(err.value)
        assert store.clip_ids[2] in str(err.value)
        store.create_feature_set(FEAT, N_SEG, (DIM,), provenance())
        with pytest.raises(MissingFeatureError, match="run extraction"):
            store.get(FEAT, store.clip_ids[0])


def test_creating_a_store_named_with_brackets_leaves_other_stores_temp_folders(tmp_path):
    """A store created by extraction is built in ``.<name>.creating-<pid>``; stale ones of this name
    are removed, never another store's: ``a[b].zarr`` as a glob would match ``.ab.zarr.creating-*``."""
    from featurestore.extract.run import _open_store

    others = [tmp_path / ".ab.zarr.creating-999", tmp_path / ".a[b].zarr.creating-x.creating-7"]
    stale = tmp_path / ".a[b].zarr.creating-998"
    for folder in (*others, stale):
        folder.mkdir()
        (folder / "marker").write_text("another creator's")
    store, opened, created = _open_store(tmp_path / "a[b].zarr", make_manifest(4), None)
    store.close()
    assert opened and created == tmp_path / "a[b].zarr"
    assert all((folder / "marker").exists() for folder in others) and not stale.exists()
    with open_store(created) as fs:
        assert fs.n_clips == 4
