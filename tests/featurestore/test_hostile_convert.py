"""`featurestore convert --overwrite` replaces an old store, never a folder that holds the source or
anything that is not a store (before the check, both were deleted without a word)."""
from __future__ import annotations

import numpy as np
import pytest

from featurestore import ClipRecord, Manifest, StoreFormatError, convert_store, create_store, open_store
from featurestore.cli import main

CLASSES = ["a", "b"]


def _store(path) -> None:
    clips = [ClipRecord(f"c{i}", label=CLASSES[i % 2], splits=frozenset({"train"})) for i in range(4)]
    with create_store(path, Manifest("toy", CLASSES, clips)) as store:
        store.create_feature_set("emb", 1, (3,), {"encoder": "x"}, dtype="float32")
        store.write_rows("emb", 0, np.arange(12, dtype=np.float32).reshape(4, 1, 3))


def test_a_destination_that_holds_the_source_is_refused_and_kept(tmp_path, capsys):
    folder = tmp_path / "project"
    _store(folder / "store.zarr")
    (folder / "notes.txt").write_text("precious")
    code = main(["convert", "-q", str(folder / "store.zarr"), str(folder), "--overwrite"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "holds the source" in err
    assert (folder / "notes.txt").read_text() == "precious"
    with open_store(folder / "store.zarr") as store:
        assert store.get("emb", "c3").tolist() == [[9.0, 10.0, 11.0]]


def test_a_destination_that_is_no_store_is_refused_and_kept(tmp_path, capsys):
    _store(tmp_path / "store.zarr")
    other = tmp_path / "dataset"
    other.mkdir()
    (other / "meta.csv").write_text("filename\n")
    not_h5 = tmp_path / "copy.h5"
    not_h5.write_text("not hdf5")
    for dst in (other, not_h5):
        code = main(["convert", "-q", str(tmp_path / "store.zarr"), str(dst), "--overwrite"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "is not a feature store" in err and str(dst) in err
    assert (other / "meta.csv").read_text() == "filename\n" and not_h5.read_text() == "not hdf5"


def test_a_destination_inside_the_source_or_the_source_itself_is_refused(tmp_path):
    src = tmp_path / "store.zarr"
    _store(src)
    for dst in (src / "copy.h5", tmp_path / "." / "store.zarr"):
        with pytest.raises(StoreFormatError, match="cannot convert"):
            convert_store(src, dst, progress=False)
    assert not (src / "copy.h5").exists() and not list(tmp_path.glob(".*converting"))


def test_an_old_store_at_the_destination_is_still_replaced(tmp_path):
    _store(tmp_path / "store.zarr")
    _store(tmp_path / "old.h5")
    with open_store(tmp_path / "old.h5", "a") as old:
        old.write_rows("emb", 0, np.zeros((4, 1, 3), dtype=np.float32))
    convert_store(tmp_path / "store.zarr", tmp_path / "old.h5", progress=False)
    with open_store(tmp_path / "old.h5") as store:
        assert store.get("emb", "c1").tolist() == [[3.0, 4.0, 5.0]]


def test_a_source_being_written_is_refused_naming_the_writer(tmp_path, capsys):
    from featurestore.store.lock import writer_lock

    _store(tmp_path / "store.zarr")
    with writer_lock(tmp_path / "store.zarr", command="featurestore extract data store.zarr"):
        code = main(["convert", "-q", str(tmp_path / "store.zarr"), str(tmp_path / "copy.h5")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "is being written by another process" in err
    assert "featurestore extract data store.zarr" in err and not (tmp_path / "copy.h5").exists()
    assert main(["convert", "-q", str(tmp_path / "store.zarr"), str(tmp_path / "copy.h5")]) == 0
    assert not (tmp_path / "store.zarr.lock").exists()


def test_a_source_whose_lock_file_cannot_be_made_still_converts(tmp_path):
    """As in a read-only folder (simulated for root, who writes those: the lock's name is taken by a folder)."""
    _store(tmp_path / "store.zarr")
    (tmp_path / "store.zarr.lock").mkdir()
    convert_store(tmp_path / "store.zarr", tmp_path / "copy.h5", progress=False)
    with open_store(tmp_path / "copy.h5") as store:
        assert store.get("emb", "c0").tolist() == [[0.0, 1.0, 2.0]]


def test_a_destination_that_links_to_a_store_replaces_that_store_and_keeps_the_link(tmp_path):
    _store(tmp_path / "store.zarr")
    (tmp_path / "scratch").mkdir()
    _store(tmp_path / "scratch" / "old.zarr")
    with open_store(tmp_path / "scratch" / "old.zarr", "a") as old:
        old.write_rows("emb", 0, np.zeros((4, 1, 3), dtype=np.float32))
    link = tmp_path / "copy.zarr"
    link.symlink_to(tmp_path / "scratch" / "old.zarr")
    assert main(["convert", "-q", str(tmp_path / "store.zarr"), str(link), "--overwrite"]) == 0
    assert link.is_symlink() and sorted(p.name for p in (tmp_path / "scratch").iterdir()) == ["old.zarr"]
    with open_store(link) as store:
        assert store.get("emb", "c1").tolist() == [[3.0, 4.0, 5.0]]


def test_a_store_at_a_url_is_not_replaced_without_overwrite(tmp_path, capsys):
    _store(tmp_path / "store.zarr")
    url = "memory://hostile-convert/copy.zarr"
    assert main(["convert", "-q", str(tmp_path / "store.zarr"), url]) == 0
    with open_store(url, "a") as copy:
        copy.write_rows("emb", 0, np.full((4, 1, 3), 7, dtype=np.float32))
    assert main(["convert", "-q", str(tmp_path / "store.zarr"), url]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    with open_store(url) as copy:
        assert copy.get("emb", "c0").tolist() == [[7.0, 7.0, 7.0]]
    assert main(["convert", "-q", str(tmp_path / "store.zarr"), url, "--overwrite"]) == 0
    with open_store(url) as copy:
        assert copy.get("emb", "c0").tolist() == [[0.0, 1.0, 2.0]]


def test_a_url_destination_that_is_the_source_is_refused(tmp_path):
    _store(tmp_path / "store.zarr")
    url = "memory://hostile-convert/same.zarr"
    convert_store(tmp_path / "store.zarr", url, progress=False)
    for dst in (url + "/", url + "/inner.zarr", "memory://hostile-convert"):
        with pytest.raises(StoreFormatError, match="one lies inside the other"):
            convert_store(url, dst, progress=False)
    with open_store(url) as store:
        assert store.get("emb", "c3").tolist() == [[9.0, 10.0, 11.0]]


@pytest.mark.parametrize("destination", ["copy.zarr", "copy.h5"])
def test_rows_a_killed_append_left_past_the_end_are_not_given_to_clips_appended_to_the_copy(tmp_path, destination):
    """A source whose arrays a killed append grew past ``n_clips`` (rows written, even marked done,
    by a writer that never committed them), converted before any writable open cut them off: the
    copy serves the committed clips, and clips appended to it start not done, with fill values."""
    import zarr

    from featurestore.errors import MissingFeatureError

    source = tmp_path / "store.zarr"
    _store(source)
    root = zarr.open_group(str(source), mode="r+")
    for name in ("features/emb/data", "features/emb/done", "features/emb/errors"):
        root[name].resize((6,) + root[name].shape[1:])
    root["features/emb/data"][4:] = 7.0
    root["features/emb/done"][4:] = True
    convert_store(source, tmp_path / destination)
    with open_store(tmp_path / destination, "a") as copy:
        assert copy.n_clips == 4 and copy.get("emb", "c3").tolist() == [[9.0, 10.0, 11.0]]
        copy.append_clips(Manifest("toy", CLASSES, [ClipRecord(f"n{i}", label="a") for i in range(2)]))
    with open_store(tmp_path / destination) as copy:
        assert copy.done_mask("emb").tolist() == [True] * 4 + [False] * 2
        with pytest.raises(MissingFeatureError):
            copy.get("emb", "n0")
        assert copy.read_rows("emb", 4, 6, check_done=False).tolist() == [[[0.0] * 3]] * 2
