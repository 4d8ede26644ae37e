"""Integrity on real files: corrupt chunks, verify(), readers in a second process, pickling, bad paths."""
from __future__ import annotations

import hashlib
import pickle
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from featurestore.cli import main
from featurestore.store.convert import convert_store
from featurestore import (
    TAU_CLASSES, ClipRecord, CorruptChunkError, Manifest, MissingFeatureError, StoreFormatError, create_store,
    open_store,
)
from tests.featurestore.chunk_paths import chunk_file

N_CLIPS, N_SEG, DIM, CHUNK = 20, 3, 4, 4
FEAT = "clip/RN50"
DATA = f"features/{FEAT}/data"
# verify reads every chunk: 7 index arrays of one chunk (clip_id, label, city, location, audio_path,
# video_path, split/fold1_train) + the id lookup's table and fence + data and done of the feature set
# in chunks of CHUNK rows (a fill without failures writes no error-text chunk)
INDEX_CHUNKS = 7 + 2
ALL_CHUNKS = INDEX_CHUNKS + 2 * (N_CLIPS // CHUNK)
PROV = {"encoder": "clip/RN50@none", "config": {}, "weights": {"kind": "random", "seed": 0}, "segments": {}}


def build(path: str, n_written: int = N_CLIPS) -> np.ndarray:
    """A store whose first ``n_written`` rows (whole chunks) are written and done."""
    clips = [ClipRecord(f"bus-lisbon-{i}-{i}", label="bus", city="lisbon", location=f"lisbon-{i}",
                        splits=frozenset({"fold1_train"})) for i in range(N_CLIPS)]
    data = np.random.default_rng(0).standard_normal((N_CLIPS, N_SEG, DIM)).astype(np.float16)
    with create_store(path, Manifest("toy", list(TAU_CLASSES), clips)) as store:
        store.create_feature_set(FEAT, N_SEG, (DIM,), PROV, chunk_clips=CHUNK)
        if n_written:
            store.write_rows(FEAT, 0, data[:n_written])
    return data


def flip_chunk_bytes(path: str, first_row: int) -> None:
    """Flip a byte in the middle of the stored (checksummed) chunk holding ``first_row``."""
    if path.endswith(".h5"):
        with h5py.File(path, "r") as f:
            info = f[DATA].id.get_chunk_info_by_coord((first_row, 0, 0))
            offset = info.byte_offset + info.size // 2
    else:
        chunk = chunk_file(path, DATA, first_row // CHUNK)
        offset, path = chunk.stat().st_size // 2, str(chunk)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ 0xFF]))


@pytest.fixture(params=["zarr", "hdf5"])
def path(request, tmp_path) -> str:
    return str(tmp_path / ("store.zarr" if request.param == "zarr" else "store.h5"))


# ------------------------------------------------------------------------------ corrupt chunks
def test_corrupt_chunk_raises_and_verify_names_rows(path):
    data = build(path)
    flip_chunk_bytes(path, 9)
    with open_store(path, "r") as store:
        ids = store.clip_ids
        np.testing.assert_array_equal(store.get(FEAT, ids[3]), data[3])
        with pytest.raises(CorruptChunkError, match="rows 8:12") as err:
            store.get(FEAT, ids[9])
        assert (err.value.start, err.value.stop) == (8, 12)
        with pytest.raises(CorruptChunkError):
            store.get_many(FEAT, [ids[0], ids[10]])
        report = store.verify()
    assert not report.ok
    assert [(p.where, p.rows) for p in report.problems] == [(DATA, (8, 12))]
    assert "could not be read" in report.problems[0].what
    assert f"(clips {ids[8]} .. {ids[11]})" in report.problems[0].what
    assert report.chunks_read == ALL_CHUNKS


def test_verify_command_names_feature_set_rows_and_clips_of_a_flipped_chunk(path, capsys):
    build(path)
    flip_chunk_bytes(path, 9)
    assert main(["verify", path]) == 1
    out = capsys.readouterr().out
    assert f"{DATA} rows 8:12" in out and "bus-lisbon-8-8 .. bus-lisbon-11-11" in out
    assert main(["get", path, "bus-lisbon-9-9", FEAT, "-o", str(Path(path).parent / "x.npy")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{DATA}: rows 8:12" in err
    assert not (Path(path).parent / "x.npy").exists()  # nothing wrong written out


def test_verify_ok_on_clean_store(path):
    build(path)
    with open_store(path, "r") as store:
        report = store.verify()
    assert report.ok and report.chunks_read == ALL_CHUNKS
    assert report.to_dict()["ok"] is True and "OK" in report.summary()


def test_verify_skips_garbage_chunks_without_done_rows(path):
    """A writer killed after writing data but before setting done leaves a chunk nobody may read."""
    data = build(path, n_written=8)
    with open_store(path, "a") as store:
        store._b.write(DATA, 8, data[8:12])  # the data half of write_rows, then the "kill"
    flip_chunk_bytes(path, 8)
    with open_store(path, "r") as store:
        report = store.verify()
        assert report.ok, report.problems
        # data and done of rows 0:8 (two chunks each) + the index; data 8:12 holds no done row and
        # is not read, done 8:20 was never written (nor any error text: none failed)
        assert report.chunks_read == INDEX_CHUNKS + 2 * 2
        with pytest.raises(MissingFeatureError):
            store.get(FEAT, store.clip_ids[8])
        with pytest.raises(CorruptChunkError):
            store.read_rows(FEAT, 8, 12, check_done=False)
    with open_store(path, "a") as store:  # a resumed run rewrites the chunk and the store is whole again
        store.write_rows(FEAT, 8, data[8:])
        assert store.verify().ok
        np.testing.assert_array_equal(store.get_many(FEAT, store.clip_ids), data)


def test_verify_reports_length_mismatch_fingerprint_and_nan(path):
    data = build(path, n_written=8)
    with open_store(path, "a") as store:
        bad = data[8:12].copy()
        bad[1, 0, 0] = np.nan
        store.write_rows(FEAT, 8, bad)
        store._b.set_attrs(f"features/{FEAT}", {"fingerprint": "0000"})
    if path.endswith(".h5"):
        with h5py.File(path, "a") as f:
            f["index/city"].resize(N_CLIPS - 1, axis=0)
    else:
        zarr.open_array(str(Path(path, "index", "city")), mode="a").resize((N_CLIPS - 1,))
    with open_store(path, "r") as store:
        report = store.verify()
    found = {(p.where, p.rows): p.what for p in report.problems}
    assert found[("index/city", None)] == f"has {N_CLIPS - 1} rows, index has {N_CLIPS} clips"
    assert "does not match its provenance" in found[(f"features/{FEAT}", None)]
    assert "NaN" in found[(DATA, (8, 12))]
    assert len(report.problems) == 3


# ------------------------------------------------------------------------------ other processes
def test_second_process_reads_same_data(path):
    data = build(path)
    with open_store(path, "r") as store:
        ids = [store.clip_ids[i] for i in (19, 0, 7, 8, 3)]
        local = store.get_many(FEAT, ids)
    np.testing.assert_array_equal(local, data[[19, 0, 7, 8, 3]])
    code = ("import hashlib, sys\nfrom featurestore import open_store\n"
            "with open_store(sys.argv[1], mode='r') as s:\n"
            "    x = s.get_many(sys.argv[2], sys.argv[3].split(','))\n"
            "print(hashlib.sha256(x.tobytes()).hexdigest(), x.shape, s.mode)\n")
    out = subprocess.run([sys.executable, "-c", code, path, FEAT, ",".join(ids)], capture_output=True,
                         text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [hashlib.sha256(local.tobytes()).hexdigest(), "(5,", "3,", "4)", "r"]


def test_pickling_reopens_read_only_and_refuses_writable(path):
    data = build(path)
    with open_store(path, "r") as store:
        clone = pickle.loads(pickle.dumps(store))
        try:
            assert clone.mode == "r" and clone._b is not store._b
            np.testing.assert_array_equal(clone.get(FEAT, clone.clip_ids[5]), data[5])
        finally:
            clone.close()
    with open_store(path, "a") as store:
        with pytest.raises(TypeError, match="mode='r'"):
            pickle.dumps(store)


# ------------------------------------------------------------------------------------ bad paths
def test_opening_what_is_not_a_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="no feature store"):
        open_store(tmp_path / "missing.zarr", "r")
    with pytest.raises(FileNotFoundError, match="no feature store"):
        open_store(tmp_path / "missing.h5", "r")
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(StoreFormatError, match="not a feature store"):
        open_store(tmp_path / "plain.h5", "r")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w", zarr_format=3).attrs["x"] = 1
    with pytest.raises(StoreFormatError, match="not a feature store"):
        open_store(tmp_path / "plain.zarr", "r")


# ------------------------------------------------------------------------------ every array sealed
FRAMES = "frames/raw"


def build_everything(path: str) -> list[str]:
    """A store holding one of everything a store writes; returns the array paths it lists.

    The index (grown by an append that adds a split), a float16 feature set with a long error text
    (HDF5 rewrites a string array wider for it), a zstd-compressed uint8 set, a prediction run and
    class features.
    """
    build(path)
    extra = [ClipRecord(f"bus-porto-{i}-{i}", label="bus", city="porto", location=f"porto-{i}",
                        splits=frozenset({"fold2_test"})) for i in range(2)]
    with open_store(path, "a") as store:
        store.append_clips(Manifest("more", list(TAU_CLASSES), extra))
        store.set_errors(FEAT, {N_CLIPS: "decode failed: " + "a long message that widens the error texts " * 3})
        store.create_feature_set(FRAMES, 2, (6, 8, 3), {"encoder": "frames", "config": {}}, dtype="uint8",
                                 chunk_clips=CHUNK, compressor="zstd")
        frames = np.random.default_rng(1).integers(0, 256, (CHUNK, 2, 6, 8, 3), dtype=np.uint8)
        store.write_rows(FRAMES, 0, frames)
        store.create_predictions("head/run1", N_SEG, {"head": "linear"}, chunk_clips=CHUNK)
        store.write_predictions("head/run1", slice(0, 6), np.full((6, N_SEG, len(TAU_CLASSES)), 0.1, np.float32))
        store.write_class_features("cliptext/RN50", np.ones((len(TAU_CLASSES), DIM), np.float32), PROV)
        assert store.arrays.compressor(f"features/{FRAMES}/data") == "zstd"
        return store.arrays.arrays()


# what build_everything must have made, so that a walk that misses a kind of array cannot pass
EXPECTED_ARRAYS = {
    "index/clip_id", "index/label", "index/split/fold1_train", "index/split/fold2_test", DATA,
    f"features/{FEAT}/done", f"features/{FEAT}/errors", f"features/{FRAMES}/data", f"features/{FRAMES}/done",
    "predictions/head/run1/probs", "class_features/cliptext/RN50/data",
}


def test_every_zarr_array_carries_a_crc32c_checksum(tmp_path):
    path = str(tmp_path / "all.zarr")
    listed = build_everything(path)
    root = zarr.open_group(path, mode="r")
    on_disk = sorted(name for name, node in root.members(max_depth=None) if isinstance(node, zarr.Array))
    assert sorted(listed) == on_disk  # the store's listing is every array zarr sees
    missing = EXPECTED_ARRAYS - set(on_disk)
    assert not missing, f"build_everything made no {sorted(missing)}: names changed?"
    codecs = {name: [c["name"] for c in root[name].metadata.to_dict()["codecs"]] for name in on_disk}
    unsealed = {name: names for name, names in codecs.items() if "crc32c" not in names}
    assert not unsealed, f"arrays written without a crc32c codec: {unsealed}"
    assert "zstd" in codecs[f"features/{FRAMES}/data"] and "zstd" not in codecs[DATA]


@pytest.mark.parametrize("made_by", ["created", "converted"])
def test_every_hdf5_dataset_carries_a_fletcher32_checksum(tmp_path, made_by):
    path = str(tmp_path / "all.h5")
    if made_by == "created":
        listed = build_everything(path)
    else:
        listed = build_everything(str(tmp_path / "all.zarr"))
        convert_store(tmp_path / "all.zarr", path, progress=False)
    datasets: dict[str, h5py.Dataset] = {}

    def collect(name: str, node) -> None:  # a visitor returning anything but None stops the walk
        if isinstance(node, h5py.Dataset):
            datasets[name] = node

    with h5py.File(path, "r") as f:
        f.visititems(collect)
        assert sorted(datasets) == sorted(listed)
        assert not EXPECTED_ARRAYS - set(datasets)
        unsealed = sorted(name for name, ds in datasets.items() if not ds.fletcher32)
        assert not unsealed, f"{made_by} HDF5 datasets without a fletcher32 checksum: {unsealed}"
        assert datasets[f"features/{FRAMES}/data"].compression == "gzip" and datasets[DATA].compression is None
        assert datasets[f"features/{FEAT}/errors"].dtype.itemsize > 16  # the widened string array too
