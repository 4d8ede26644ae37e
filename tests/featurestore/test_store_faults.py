"""Faults injected for real into stores on disk: deleted and flipped chunks anywhere (index included),
kills in the middle of attribute writes, appends and conversions, hostile HDF5 files, unchunked HDF5.

Each test fails on the store as it was before these faults were handled: a deleted chunk read as
zeros, a corrupt index array gave a raw codec error (exit 2), a killed append or attribute write left
a store that verify reported forever.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from featurestore import (
    TAU_CLASSES, ClipRecord, CorruptChunkError, Manifest, MissingChunkError, StoreFormatError, convert_store,
    create_store, open_store,
)
from featurestore.cli import main
from tests.featurestore.chunk_paths import chunk_file, chunk_files, store_chunk_files

N_CLIPS, N_SEG, DIM, CHUNK = 12, 2, 3, 4
FEAT = "clip/RN50"
DATA = f"features/{FEAT}/data"
PROV = {"encoder": "clip/RN50@none", "config": {}, "weights": {"kind": "random", "seed": 0}, "segments": {}}
REPO = Path(__file__).resolve().parents[2]


def clips(first: int, n: int) -> list[ClipRecord]:
    return [ClipRecord(f"{TAU_CLASSES[i % 10]}-lisbon-{i}-{i}", label=TAU_CLASSES[i % 10], city="lisbon",
                       location=f"lisbon-{i}", splits=frozenset({"fold1_train" if i % 3 else "fold1_evaluate"}))
            for i in range(first, first + n)]


def build(path: str) -> np.ndarray:
    """Every clip labelled, done and written: a store with nothing missing."""
    data = np.random.default_rng(0).standard_normal((N_CLIPS, N_SEG, DIM)).astype(np.float16)
    with create_store(path, Manifest("toy", list(TAU_CLASSES), clips(0, N_CLIPS))) as store:
        store.create_feature_set(FEAT, N_SEG, (DIM,), PROV, chunk_clips=CHUNK)
        store.write_rows(FEAT, 0, data)
    return data


def flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.fixture
def zstore(tmp_path) -> tuple[str, np.ndarray]:
    path = str(tmp_path / "store.zarr")
    return path, build(path)


# --------------------------------------------------------------------------- silent wrong data
def test_deleted_feature_chunk_is_refused_by_get_and_found_by_verify(zstore, capsys):
    path, data = zstore
    chunk_file(path, DATA, 1).unlink()  # rows 4:8, all marked done
    with open_store(path) as store:
        ids = store.clip_ids
        np.testing.assert_array_equal(store.get(FEAT, ids[0]), data[0])
        with pytest.raises(MissingChunkError, match=r"features/clip/RN50/data: rows 4:8"):
            store.get(FEAT, ids[5])
        with pytest.raises(MissingChunkError):
            store.get_many(FEAT, [ids[0], ids[6]])
        report = store.verify()
    assert [(p.where, p.rows) for p in report.problems] == [(DATA, (4, 8))]
    assert "missing" in report.problems[0].what
    assert f"(clips {ids[4]} .. {ids[7]})" in report.problems[0].what
    assert main(["get", path, ids[5], FEAT, "-o", str(Path(path).parent / "x.npy")]) == 1
    assert main(["verify", path]) == 1
    assert "features/clip/RN50/data rows 4:8" in capsys.readouterr().out


def test_deleted_label_chunk_is_not_read_as_unlabelled(zstore):
    path, _ = zstore
    chunk_file(path, "index/label").unlink()
    with open_store(path) as store:
        with pytest.raises(MissingChunkError, match="index/label: rows 0:12"):
            store.labels
        report = store.verify()
    assert ("index/label", (0, N_CLIPS)) in [(p.where, p.rows) for p in report.problems]
    assert main(["verify", path]) == 1
    assert main(["show", path, clips(0, N_CLIPS)[1].clip_id]) == 1


def test_flipped_byte_in_a_split_column_is_found_and_select_says_which_array(zstore):
    path, _ = zstore
    flip_byte(chunk_file(path, "index/split/fold1_train"))
    with open_store(path) as store:
        with pytest.raises(CorruptChunkError, match="index/split/fold1_train: rows 0:12"):
            store.select(split="fold1_train")
        report = store.verify()
    assert [(p.where, p.rows) for p in report.problems] == [("index/split/fold1_train", (0, N_CLIPS))]


def test_flipped_byte_in_clip_ids_is_exit_1_naming_the_array(zstore, capsys):
    path, _ = zstore
    flip_byte(chunk_file(path, "index/clip_id"))
    assert main(["verify", path]) == 1
    out = capsys.readouterr().out
    assert "index/clip_id rows 0:12" in out
    # ids are looked up in the index's own checksummed lookup table: the clip is still found by id,
    # and what reads the damaged column names it
    assert main(["show", path, clips(0, N_CLIPS)[1].clip_id]) == 0
    with open_store(path) as store, pytest.raises(CorruptChunkError, match="index/clip_id: rows 0:12 could not"):
        store.select(split="fold1_train")


def test_flipped_byte_in_a_done_chunk_is_exit_1_for_get(zstore, capsys):
    path, _ = zstore
    flip_byte(chunk_file(path, f"features/{FEAT}/done", 0))
    clip_id = clips(0, N_CLIPS)[1].clip_id
    assert main(["get", path, clip_id, FEAT, "-o", str(Path(path).parent / "x.npy")]) == 1
    assert f"features/{FEAT}/done: rows 0:4 could not be read" in capsys.readouterr().err
    with open_store(path) as store:
        assert (f"features/{FEAT}/done", (0, 4)) in [(p.where, p.rows) for p in store.verify().problems]


def test_every_chunk_of_a_clean_store_is_read_by_verify(zstore):
    path, _ = zstore
    with open_store(path) as store:
        report = store.verify()
    n_files = len(store_chunk_files(path))
    assert len(chunk_files(path, DATA)) == N_CLIPS // CHUNK  # the listing finds the layout written
    assert report.ok and report.chunks_read == n_files


def test_a_store_of_fill_values_keeps_its_chunks(tmp_path):
    """Evaluation data has no labels (-1 = the fill value): zarr would skip writing that chunk."""
    path = str(tmp_path / "eval.zarr")
    unlabelled = [ClipRecord(f"clip{i}", label=None) for i in range(3)]
    with create_store(path, Manifest("eval", list(TAU_CLASSES), unlabelled)) as store:
        store.create_feature_set(FEAT, N_SEG, (DIM,), PROV)
        store.write_rows(FEAT, 0, np.zeros((3, N_SEG, DIM), np.float16))  # zeros = the fill value too
    with open_store(path) as store:
        assert store.verify().ok
        assert list(store.labels) == [-1, -1, -1]
        assert not store.get(FEAT, "clip1").any()
    chunk_file(path, DATA).unlink()
    with open_store(path) as store, pytest.raises(MissingChunkError):
        store.get(FEAT, "clip1")


# ------------------------------------------------------------------------------------- kills
def run_killed(*parts: str) -> int:
    """Run Python snippets that SIGKILL the process at the point they choose; returns the exit code."""
    script = "\n".join(textwrap.dedent(part) for part in parts)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode in (0, -9), proc.stderr[-2000:]
    return proc.returncode


KILL_ON_NTH = """
    import os, signal, sys
    import numpy as np
    from featurestore.store import _zarr
    target, nth, calls = {target!r}, {nth}, [0]
    original = getattr(_zarr.ZarrBackend, target)
    def killing(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)
    setattr(_zarr.ZarrBackend, target, killing)
"""


KILL_ON_NTH_METADATA_WRITE = """
    import os, signal
    from zarr.storage import LocalStore
    nth, calls = {nth}, [0]
    original = LocalStore.set
    async def killing(self, key, value, *args, **kwargs):
        if key.startswith("features/") and key.endswith("zarr.json"):
            calls[0] += 1
            if calls[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
        return await original(self, key, value, *args, **kwargs)
    LocalStore.set = killing
    from featurestore.store import _local_nodes  # new groups' and arrays' zarr.json, written directly
    original_node = _local_nodes.LocalNodes._write
    def killing_node(self, path, body):
        if path.startswith("features/"):
            calls[0] += 1
            if calls[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
        return original_node(self, path, body)
    _local_nodes.LocalNodes._write = killing_node
"""


def test_kill_at_every_metadata_write_of_a_new_feature_set_is_repaired_by_a_rerun(tmp_path):
    """zarr rewrites zarr.json once per attribute key with ``attrs.update``: a kill in between left
    a set with a fingerprint but no shape attributes, reopened as finished and reported forever."""
    path = str(tmp_path / "store.zarr")
    data = np.random.default_rng(1).standard_normal((N_CLIPS, N_SEG, DIM)).astype(np.float16)
    with create_store(path, Manifest("toy", list(TAU_CLASSES), clips(0, N_CLIPS))):
        pass
    create = f"""
        from featurestore import open_store
        with open_store({path!r}, "a") as store:
            store.create_feature_set({FEAT!r}, {N_SEG}, ({DIM},), {PROV!r}, chunk_clips={CHUNK})
    """
    codes = []
    for nth in range(1, 9):  # the group, three arrays, the set's attributes (and beyond: no kill)
        codes.append(run_killed(KILL_ON_NTH_METADATA_WRITE.format(nth=nth), create))
        with open_store(path, "a") as store:  # the rerun
            store.create_feature_set(FEAT, N_SEG, (DIM,), PROV, chunk_clips=CHUNK)
            store.write_rows(FEAT, 0, data)
            assert store.verify().ok, (nth, store.verify().problems)
            np.testing.assert_array_equal(store.get_many(FEAT, store.clip_ids), data)
            store.delete_feature_set(FEAT)
    assert codes.count(-9) >= 5, codes  # every metadata write of the creation was a kill point


def state(path: str) -> dict:
    """Everything a store holds, for comparing a recovered store with a clean one."""
    with open_store(path) as store:
        attrs = {k: v for k, v in store.attrs.items() if k not in ("created_by",)}
        for d in attrs.get("datasets", []):
            d.pop("dataset_root", None)
        out = {"attrs": attrs, "ids": store.clip_ids, "labels": store.labels.tolist(),
               "columns": {c: store.column(c).tolist() for c in store.columns()},
               "done": store.done_mask(FEAT).tolist(), "ok": store.verify().ok}
        out["data"] = store.get_many(FEAT, store.select(split=["fold1_train", "fold1_evaluate"])[:4]).tolist()
    return out


def test_kill_while_appending_clips_then_rerun_equals_a_clean_run(tmp_path):
    clean = str(tmp_path / "clean.zarr")
    first = Manifest("toy", list(TAU_CLASSES), clips(0, 8))
    more = Manifest("toy", list(TAU_CLASSES), clips(8, 6))
    data = np.random.default_rng(2).standard_normal((8, N_SEG, DIM)).astype(np.float16)

    def start(path: str) -> None:
        with create_store(path, first) as store:
            store.create_feature_set(FEAT, N_SEG, (DIM,), PROV, chunk_clips=CHUNK)
            store.write_rows(FEAT, 0, data)

    start(clean)
    with open_store(clean, "a") as store:
        store.append_clips(more)
    expected = state(clean)
    append = f"""
        import pickle
        from featurestore import open_store
        more = pickle.loads({__import__("pickle").dumps(more)!r})
        with open_store(PATH, "a") as store:
            store.append_clips(more)
    """
    points = [("resize", 1), ("resize", 5), ("write", 1), ("write", 4), ("write", 7), ("set_attrs", 1)]
    for target, nth in points:
        path = str(tmp_path / f"killed-{target}-{nth}.zarr")
        start(path)
        code = run_killed(KILL_ON_NTH.format(target=target, nth=nth), append.replace("PATH", repr(path)))
        assert code == -9, f"{target} #{nth} was never reached"
        with open_store(path, "a") as store:  # the rerun: a writable open rolls the append back first
            assert store.n_clips == 8
            store.append_clips(more)
        assert state(path) == expected, f"killed at {target} #{nth}"


def test_a_reader_ignores_rows_of_an_append_that_never_committed(tmp_path):
    path = str(tmp_path / "store.zarr")
    build(path)
    more = Manifest("toy", list(TAU_CLASSES), clips(N_CLIPS, 4))
    code = run_killed(KILL_ON_NTH.format(target="set_attrs", nth=1), f"""
        import pickle
        from featurestore import open_store
        with open_store({path!r}, "a") as store:
            store.append_clips(pickle.loads({__import__("pickle").dumps(more)!r}))
    """)
    assert code == -9
    with open_store(path) as store:
        assert store.n_clips == N_CLIPS and len(store.labels) == N_CLIPS
        assert store.verify().ok


def test_killed_convert_leaves_no_destination_and_a_rerun_converts(tmp_path):
    src = str(tmp_path / "store.zarr")
    data = build(src)
    dst = tmp_path / "copy.h5"
    code = run_killed(f"""
        import os, signal
        from featurestore.store import _hdf5
        from featurestore import convert_store
        original, calls = _hdf5.HDF5Backend.write, [0]
        def killing(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == 5:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, *args, **kwargs)
        _hdf5.HDF5Backend.write = killing
        convert_store({src!r}, {str(dst)!r}, progress=False)
    """)
    assert code == -9
    assert not dst.exists()
    assert main(["convert", src, str(dst), "--quiet"]) == 0
    with open_store(dst) as store:
        np.testing.assert_array_equal(store.get_many(FEAT, store.clip_ids), data)
        assert store.verify().ok
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ------------------------------------------------------------------------------- hostile HDF5
def hdf5_store(tmp_path) -> str:
    path = str(tmp_path / "store.h5")
    build(path)
    return path


def test_hdf5_dataset_with_external_storage_is_refused(tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"SECRET" * 100)
    path = hdf5_store(tmp_path)
    with h5py.File(path, "a") as f:
        f.create_dataset("index/evil", shape=(600,), dtype="u1", external=[(str(outside), 0, 600)])
    with pytest.raises(StoreFormatError, match="index/evil uses external storage"):
        open_store(path)
    with pytest.raises(StoreFormatError):
        open_store(path, "a")
    assert main(["show", path, clips(0, N_CLIPS)[0].clip_id]) == 2
    assert main(["verify", path]) == 2
    assert outside.read_bytes() == b"SECRET" * 100


def test_hdf5_virtual_dataset_and_links_out_of_the_file_are_refused(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["secret"] = np.arange(12, dtype=np.int16)
    path = hdf5_store(tmp_path)
    with h5py.File(path, "a") as f:
        layout = h5py.VirtualLayout(shape=(12,), dtype=np.int16)
        layout[:] = h5py.VirtualSource(str(other), "secret", shape=(12,))
        del f["index/label"]
        f.create_virtual_dataset("index/label", layout)
    with pytest.raises(StoreFormatError, match="index/label is a virtual dataset"):
        open_store(path)
    path2 = str(tmp_path / "linked.h5")
    build(path2)
    with h5py.File(path2, "a") as f:
        f["features/elsewhere"] = h5py.ExternalLink(str(other), "/")
    with pytest.raises(StoreFormatError, match="features/elsewhere is an external link"):
        open_store(path2)
    assert main(["ls", path2]) == 2
    path3 = str(tmp_path / "aliased.h5")
    build(path3)
    with h5py.File(path3, "a") as f:
        f["index/alias"] = h5py.SoftLink("/index/clip_id")
    with pytest.raises(StoreFormatError, match="index/alias is a soft link"):
        open_store(path3)


def test_unchunked_hdf5_store_converts(tmp_path):
    """Other HDF5 tools write contiguous datasets by default; ``ds.chunks`` is then None."""
    path = hdf5_store(tmp_path)
    with h5py.File(path, "a") as f:
        for name in (DATA, "index/label"):
            values, attrs = f[name][...], dict(f[name].attrs)
            del f[name]
            f.create_dataset(name, data=values)  # contiguous
            f[name].attrs.update(attrs)
    dst = str(tmp_path / "out.zarr")
    convert_store(path, dst, progress=False)
    with open_store(path) as a, open_store(dst) as b:
        expected = a.get_many(FEAT, a.clip_ids)
        np.testing.assert_array_equal(b.get_many(FEAT, b.clip_ids), expected)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert a.verify().ok and b.verify().ok
    assert main(["convert", path, str(tmp_path / "out.h5"), "--quiet"]) == 0  # the command, too
    with open_store(str(tmp_path / "out.h5")) as c:
        np.testing.assert_array_equal(c.get_many(FEAT, c.clip_ids), expected)


def test_an_unchunked_hdf5_store_that_must_grow_is_refused_in_one_line(tmp_path):
    """A contiguous dataset cannot be resized or rewritten chunk-wise: appending clips to such a store
    is refused naming the dataset and the way out (convert), and the store is left as it was."""
    path = hdf5_store(tmp_path)
    with h5py.File(path, "a") as f:
        values, attrs = f["index/clip_id"][...], dict(f["index/clip_id"].attrs)
        del f["index/clip_id"]
        f.create_dataset("index/clip_id", data=values)
        f["index/clip_id"].attrs.update(attrs)
    with open_store(path, "a") as store, pytest.raises(StoreFormatError, match="index/clip_id is not chunked"):
        store.append_clips(Manifest("more", list(TAU_CLASSES), clips(N_CLIPS, 2)))
    with open_store(path) as store:
        assert store.n_clips == N_CLIPS and store.verify().ok


def test_schema_1_stores_are_still_read(zstore):
    """Stores written before schema 2 have no ``n_clips`` and may lack chunks of fill values."""
    path, data = zstore
    meta = Path(path, "zarr.json")
    doc = json.loads(meta.read_text())
    doc["attributes"]["schema_version"] = 1
    del doc["attributes"]["n_clips"]
    meta.write_text(json.dumps(doc))
    chunk_file(path, DATA, 2).unlink()  # a version 1 store kept no chunk of zeros: read as before
    with open_store(path) as store:
        assert store.n_clips == N_CLIPS and store.attrs["schema_version"] == 1
        np.testing.assert_array_equal(store.get_many(FEAT, store.clip_ids[:8]), data[:8])
        assert not store.get(FEAT, store.clip_ids[9]).any()
        assert store.verify().ok
    converted = str(Path(path).parent / "converted.zarr")
    convert_store(path, converted, progress=False)
    with open_store(converted) as store:  # every chunk written: a schema 2 store
        assert store.attrs["schema_version"] == 2 and store.verify().ok
        np.testing.assert_array_equal(store.get_many(FEAT, store.clip_ids[:8]), data[:8])
    chunk_file(converted, DATA, 2).unlink()
    with open_store(converted) as store, pytest.raises(MissingChunkError):
        store.get(FEAT, store.clip_ids[9])


def test_a_writable_open_without_repair_leaves_an_uncommitted_append_to_the_lock_holder(tmp_path):
    """Dask tasks and extra writers open with ``repair=False`` (the writer-lock holder repaired the
    store): their open leaves the rows past ``n_clips`` alone, and a plain writable open cuts them."""
    path = str(tmp_path / "store.zarr")
    build(path)
    with open_store(path, "a") as store:  # what an append killed before its commit leaves: longer arrays
        store.arrays.resize("index/city", N_CLIPS + 3)
    with open_store(path, "a", repair=False) as store:
        assert store.arrays.shape("index/city")[0] == N_CLIPS + 3
        assert store.open_args["repair"] is False
    with open_store(path, "a") as store:
        assert store.arrays.shape("index/city")[0] == N_CLIPS and store.n_clips == N_CLIPS
