"""The local fast write path (plain chunks, vlen-utf8 texts, shards, ``zarr.json`` written directly)
against hostile inputs: whatever a store is given, plain zarr-python reads back exactly that, and
every id resolves to its own row, after any sequence of creates and appends.

Texts that repeat only in the first 1,024 of a chunk (the sample ``vlen_utf8`` decides from), NULs,
non-ASCII, very long and empty texts; numpy's strings (``np.str_``) where Python's are expected;
appends of one clip across the 65,536-row index chunk; feature rows big-endian, strided, float32
for float16, NaN; keys crafted to share high halves; a roll back followed by a growth (the rows
cut off must not come back); short writes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import xxhash
import zarr

from featurestore import ClipRecord, FeatureStore, Manifest, create_store, open_store
from featurestore.errors import MissingFeatureError, UnknownClipError
from featurestore.store import _file_writes, index
from featurestore.store._backend import STRING
from featurestore.store._chunk_files import vlen_utf8
from featurestore.store._hdf5 import HDF5Backend
from featurestore.store._zarr import ZarrBackend
from featurestore.store.layout import INDEX_CHUNK_ROWS

PROV = {"encoder": "t/hostile", "config": {}, "weights": {"kind": "random", "seed": 0}, "segments": {}}
CLASSES = ["a", "b"]


def _vlen(texts: list) -> bytes:
    """What zarr-python's vlen-utf8 codec stores for ``texts`` (numcodecs, given plain str)."""
    plain = np.empty(len(texts), dtype=object)
    plain[:] = [str.__str__(t) if isinstance(t, str) else t for t in texts]
    return bytes(numcodecs.VLenUTF8().encode(plain))


def _objects(texts: list) -> np.ndarray:
    out = np.empty(len(texts), dtype=object)
    out[:] = texts
    return out


# ------------------------------------------------------------------------------ vlen-utf8 bodies
def _texts(kind: str, n: int) -> list[str]:
    """Hostile text columns: what each one tests is in its name."""
    if kind == "repeats then distinct":  # the sample (first 1,024) says "repeated", the rest is not
        return ["r"] * min(n, 1500) + [f"u{i}é\x00" for i in range(max(0, n - 1500))]
    if kind == "empty then distinct":
        return [""] * min(n, 1100) + [f"late {i}" for i in range(max(0, n - 1100))]
    if kind == "mostly repeats":
        return [("Zürich", "", "日本")[i % 3] if i < 1200 else f"v{i}" for i in range(n)]
    if kind == "nul":
        return ["\x00" * (i % 3) + "x\x00" if i % 5 else "" for i in range(n)]
    if kind == "long":
        return ["ab" * 5000 if i % 7 == 0 else "s" for i in range(n)]
    if kind == "emoji":
        return ["\U0001F600" * (i % 4) for i in range(n)]
    return [f"t{i % 3}" for i in range(n)]


KINDS = ["repeats then distinct", "empty then distinct", "mostly repeats", "nul", "long", "emoji", "few"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 8, 1024, 1025, 3000])
def test_hostile_text_chunks_are_encoded_as_zarr_encodes_them(kind, n):
    texts = _texts(kind, n)
    assert bytes(vlen_utf8(_objects(texts))) == _vlen(texts)


def test_numpy_strings_are_encoded_as_zarr_python_stores_them():
    """numcodecs takes exact str only; zarr-python stores numpy's (``np.str_``) as their text, and so
    must the store's own encoding: every path (repeated, unique, late in a repeated chunk, one text
    seen n times) gives zarr's bytes; what is no str is still refused."""
    cases = [[np.str_("Zürich")] * 2000,  # repeated, all numpy
             [np.str_(f"id{i}") for i in range(3000)],  # unique, all numpy
             ["x", "y"] * 600 + [np.str_("late"), "y"],  # a numpy text after a repeated sample
             [f"u{i}" for i in range(1500)] + [np.str_("é")]]  # one after unique texts
    for texts in cases:
        assert bytes(vlen_utf8(_objects(texts))) == _vlen(texts)
    view = np.broadcast_to(np.array(np.str_("a/b.wav"), dtype=object), (500,))
    assert bytes(vlen_utf8(view)) == _vlen(["a/b.wav"] * 500)
    for bad in (["x", "y"] * 600 + [3], [f"u{i}" for i in range(1500)] + [b"x"]):
        with pytest.raises(TypeError):
            vlen_utf8(_objects(bad))


def test_a_store_of_numpy_string_ids_and_texts_reads_back_through_zarr(tmp_path):
    """Ids and texts taken from numpy arrays (a list of a numpy column, records filled from one) are
    stored as their text: the local store refused them (numcodecs' "Expected str, got numpy.str_")
    where memory:// Zarr and HDF5 stores took them."""
    ids = [np.str_(f"c{i}-é") for i in range(1500)]
    cities = list(np.array(["Lyon"] * 1200 + [f"v{i}" for i in range(300)]))
    records = [ClipRecord(np.str_("r0"), label="a", city=np.str_("Zürich")), ClipRecord("r1", label="b", city="Oslo")]
    path = tmp_path / "s.zarr"
    with create_store(path, Manifest("np", CLASSES, records)) as store:
        store.append_clips(Manifest.from_columns("np", CLASSES, ids, label=["a"] * 1500, city=cities,
                                                 location=list(np.array(["p", ""] * 750))))
        assert store.rows(["r0", "c1499-é", "c0-é"]).tolist() == [0, 1501, 2]
    root = zarr.open_group(str(path), mode="r")
    assert list(root["index/clip_id"][:]) == ["r0", "r1", *map(str, ids)]
    assert list(root["index/city"][:]) == ["Zürich", "Oslo", *map(str, cities)]
    assert list(root["index/location"][:]) == ["", ""] + ["p", ""] * 750


# -------------------------------------------------------------------- index columns and lookups
def _storable(texts: list[str]) -> list[str]:
    """``texts`` with each NUL as U+0001: a manifest text holding a NUL is refused (see below)."""
    return [t.replace("\x00", "\x01") for t in texts]


def test_a_manifest_text_holding_a_nul_is_refused_before_anything_is_written(tmp_path):
    """Texts are read back as numpy strings, which drop trailing NULs ("x\\0" came back as "x", and
    ``select(city="x\\0")`` found nothing): such a text is refused naming its clip, and an append of
    it leaves every file as it was."""
    path = tmp_path / "s.zarr"
    with create_store(path, Manifest.from_columns("n", CLASSES, ["a0", "a1"], label=["a", "b"])) as store:
        before = {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in path.rglob("*") if f.is_file()}
        for column in ("city", "location"):
            texts = {column: ["ok", "x\x00"]}
            with pytest.raises(ValueError, match=rf"clip 'b1': its {column} 'x\\x00' holds a NUL"):
                store.append_clips(Manifest.from_columns("n", CLASSES, ["b0", "b1"], label=["a", "b"], **texts))
        assert store.n_clips == 2
    assert {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in path.rglob("*") if f.is_file()} == before


def _index_scenario(tmp_path: Path, sizes: list[int], kinds: list[str]) -> None:
    """Create then append ``sizes`` clips (hostile ids, cities, locations, labels, splits), then check
    every index column through plain zarr-python and every id through the store."""
    path = tmp_path / "s.zarr"
    ids, cities, locations, labels = [], [], [], []
    splits: dict[str, list[bool]] = {"train": [], "test": []}
    for j, n in enumerate(sizes):
        new = [f"ü{len(ids) + i}-é" if (len(ids) + i) % 3 == 0 else f"c{len(ids) + i}" for i in range(n)]
        city, location = _storable(_texts(kinds[j % len(kinds)], n)), _storable(_texts(kinds[(j + 1) % len(kinds)], n))
        label = [None if i % 4 == 0 else CLASSES[i % 2] for i in range(n)]
        masks = {}
        if j % 2 == 0:
            masks["train"] = np.arange(n) % 2 == 0
        if j % 3 == 1:
            masks["test"] = np.arange(n) % 3 == 0
        manifest = Manifest.from_columns("hostile", CLASSES, new, label=label, city=city, location=location,
                                         splits=masks)
        if j == 0:
            with create_store(path, manifest) as store:
                store.create_feature_set("f", 1, (2,), PROV, chunk_clips=16)
        else:
            with open_store(path, "a") as store:
                store.append_clips(manifest)
        ids += new
        cities += city
        locations += location
        labels += [-1 if v is None else CLASSES.index(v) for v in label]
        for split in splits:
            splits[split] += masks.get(split, np.zeros(n, dtype=bool)).tolist()
    root = zarr.open_group(str(path), mode="r")
    n = len(ids)
    assert list(root["index/clip_id"][:]) == ids
    assert list(root["index/city"][:]) == cities
    assert list(root["index/location"][:]) == locations
    assert list(root["index/audio_path"][:]) == [""] * n
    assert root["index/label"][:].tolist() == labels
    for split, members in splits.items():
        assert root[f"index/split/{split}"][:].tolist() == members
    values = (np.arange(2 * n, dtype=np.float32).reshape(n, 1, 2) % 2048)
    with open_store(path, "a") as store:
        assert store.n_clips == n and store.clip_ids == ids
        assert store.rows(ids).tolist() == list(range(n))
        store.write_rows("f", 0, values)
    with open_store(path) as store:
        for i in sorted({0, n // 2, n - 1}):
            assert store.row(ids[i]) == i
            assert store.get("f", ids[i]).tolist() == values[i].tolist()
        np.testing.assert_array_equal(store.get_many("f", ids[::-1]), values[::-1])
    np.testing.assert_array_equal(zarr.open_group(str(path), mode="r")["features/f/data"][:], values)


@pytest.mark.parametrize("sizes", [[1, 1, 1], [1025, 1], [7, 1030, 1, 2]])
def test_small_stores_of_hostile_texts_read_back_through_zarr(tmp_path, sizes):
    _index_scenario(tmp_path, sizes, KINDS)


def test_appends_of_one_clip_across_the_index_chunk_boundary_read_back_through_zarr(tmp_path):
    """chunk - 1 clips, then one (the chunk's last row), one (a new chunk, written whole by the
    store), then 1,600 unaligned (through zarr) whose texts repeat only in the sample."""
    _index_scenario(tmp_path, [INDEX_CHUNK_ROWS - 1, 1, 1, 1600], ["mostly repeats", "repeats then distinct", "nul"])


def test_a_new_chunk_whose_texts_repeat_only_in_the_sample_reads_back_through_zarr(tmp_path):
    """A whole chunk, then an append starting the next chunk (written by the store's own encoder)
    whose values are repeated in the first 1,024 rows and distinct after."""
    _index_scenario(tmp_path, [INDEX_CHUNK_ROWS, 3000], ["empty then distinct", "repeats then distinct"])


def test_an_append_repeating_a_stored_id_changes_no_file(tmp_path):
    path = tmp_path / "s.zarr"
    with create_store(path, Manifest.from_columns("d", CLASSES, [f"é{i}" for i in range(1030)])) as store:
        store.create_feature_set("f", 1, (2,), PROV, chunk_clips=16)
        store.append_clips(Manifest.from_columns("d", CLASSES, ["x"]))

    def files() -> dict[str, str]:
        return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(path.rglob("*")) if p.is_file()}

    before = files()
    for repeat in (["y", "é1029"], ["x"], ["z", "z"]):
        with open_store(path, "a") as store:
            with contextlib.suppress(ValueError):  # a manifest repeating its own id is refused before
                store.append_clips(Manifest.from_columns("d", CLASSES, repeat))
                pytest.fail(f"{repeat} was appended")
        assert files() == before


# ------------------------------------------------------------------------------------- keys
def _crafted_keys(rng: np.random.Generator, n: int, mode: int) -> np.ndarray:
    """``[n, 2]`` uint64 keys whose high halves collide in chosen ways."""
    pool = rng.integers(0, 2**64, size=n // 3 + 1, dtype=np.uint64)
    if mode == 0:  # repeated high halves
        high = rng.choice(pool, n)
    elif mode == 1:  # one high half, the largest
        high = np.full(n, np.uint64(2**64 - 1))
    elif mode == 2:  # equal upper bits, differing only in the low bits the packed sort replaces
        high = (rng.choice(pool, n) & ~np.uint64(0xFFFF)) | rng.integers(0, 4, n, dtype=np.uint64)
    elif mode == 3:  # tiny values
        high = rng.integers(0, 8, n, dtype=np.uint64)
    else:
        high = rng.integers(0, 2**64, n, dtype=np.uint64)
    low = rng.integers(0, 2**64, n, dtype=np.uint64) if mode % 2 else rng.integers(0, 3, n, dtype=np.uint64)
    return np.stack([high, low], axis=1).astype(np.uint64)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 8, 9, 63, 64, 65, 1024, 1025])
def test_key_order_and_lookup_table_sort_as_lexsort(n):
    rng = np.random.default_rng(n)
    for mode in range(5):
        keys = _crafted_keys(rng, n, mode)
        order = index.key_order(keys)
        reference = np.lexsort((keys[:, 1], keys[:, 0]))
        assert sorted(order.tolist()) == list(range(n))
        np.testing.assert_array_equal(keys[order], keys[reference])
        table = index.lookup_table(keys, np.arange(n, dtype=np.uint64))
        np.testing.assert_array_equal(table[:, :2], keys[reference])
        np.testing.assert_array_equal(keys[table[:, 2].astype(np.intp)], table[:, :2])
        once = np.unique(keys, axis=0, return_counts=True)
        single = {tuple(k) for k, c in zip(once[0].tolist(), once[1].tolist()) if c == 1}
        found = index.search_table(table, keys)
        for i, key in enumerate(keys.tolist()):
            if tuple(key) in single:
                assert found[i] == i


def test_merged_tables_sort_as_lexsort_and_repeats_are_runs():
    rng = np.random.default_rng(7)
    for _ in range(200):
        n_old, n_new = rng.integers(0, 150, 2)
        high = rng.integers(0, 6, n_old + n_new, dtype=np.uint64) << np.uint64(rng.integers(0, 60))
        keys = np.stack([high, rng.integers(0, 5, n_old + n_new, dtype=np.uint64)], axis=1)
        merged = index._merge(index.lookup_table(keys[:n_old], np.arange(n_old, dtype=np.uint64)),
                              index.lookup_table(keys[n_old:], np.arange(n_old, n_old + n_new, dtype=np.uint64)))
        np.testing.assert_array_equal(merged[:, :2], keys[np.lexsort((keys[:, 1], keys[:, 0]))])
        assert sorted(merged[:, 2].tolist()) == list(range(n_old + n_new))
        repeats = int((merged[1:, :2] == merged[:-1, :2]).all(axis=1).sum())
        assert repeats == sum(stop - start - 1 for start, stop in index.equal_key_runs(merged))


def test_ids_whose_keys_share_high_halves_resolve_to_their_rows(tmp_path, monkeypatch):
    """Keys with three high halves in all (runs crossing the lookup's 64-entry blocks), over appends:
    every id is found at its row by ``row``, ``rows`` and ``get_many``; others are unknown."""
    def weak(data: bytes) -> bytes:
        digest = xxhash.xxh3_128_digest(data)
        return bytes(7) + bytes([digest[0] % 3]) + digest[8:]

    monkeypatch.setitem(index._KEYS, "xxh3-128", weak)
    path, ids = tmp_path / "s.zarr", []
    for j, n in enumerate([300, 1, 64, 129]):
        new = [f"k{len(ids) + i}" for i in range(n)]
        manifest = Manifest.from_columns("w", CLASSES, new, label=["a"] * n)
        if j == 0:
            with create_store(path, manifest) as store:
                store.create_feature_set("f", 1, (2,), PROV, chunk_clips=32)
        else:
            with open_store(path, "a") as store:
                store.append_clips(manifest)
        ids += new
        values = np.arange(2 * len(ids), dtype=np.float16).reshape(-1, 1, 2)
        with open_store(path, "a") as store:
            store.write_rows("f", 0, values)
        with open_store(path) as store:
            assert store.attrs[index.LOOKUP_ATTR]["n_clips"] == len(ids)  # the lookup is used
            assert [store.row(ids[i]) for i in range(0, len(ids), 7)] == list(range(0, len(ids), 7))
            assert store.rows(ids[::-3]).tolist() == list(range(len(ids)))[::-3]
            np.testing.assert_array_equal(store.get_many("f", ids), values)
            for unknown in ("nope", "k99999"):
                with pytest.raises(UnknownClipError):
                    store.row(unknown)


# ------------------------------------------------------------------------------- feature rows
SETS = {  # name: (dtype, compressor, feature shape, chunk clips)
    "h": ("float16", None, (3,), 16),
    "z": ("float32", "zstd", (2, 2), 8),
    "u": ("uint8", None, (5,), 32),
    "b": ("bool", None, (1,), 16),
    "i": ("int64", None, (3,), 4),
    "wide": ("float16", None, (600,), 64),  # not sharded (one inner chunk per chunk)
}


def _rows(rng: np.random.Generator, dtype: str, shape: tuple) -> np.ndarray:
    if dtype.startswith("float"):
        rows = rng.standard_normal(shape).astype(">f8")
        rows[0] = np.nan
        return np.asfortranarray(rows) if rng.integers(2) else rows[:, ::-1][:, ::-1]  # F order or a view
    if dtype == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    return rng.integers(0, 200, shape).astype(">i4")


@pytest.mark.parametrize("sizes", [[1, 1, 1], [37, 1, 3], [63, 64, 1, 129]])
def test_feature_rows_of_any_layout_read_back_through_zarr_as_sets_grow(tmp_path, sizes):
    """Sets of several dtypes and chunkings, grown by appends (of one clip too), written block by
    block from big-endian, Fortran-ordered or NaN rows with some rows failed: data, done flags and
    error texts read back through zarr-python as written, and through the store."""
    rng = np.random.default_rng(len(sizes) * 100 + sizes[0])
    path, ids = tmp_path / "s.zarr", []
    ref: dict[str, np.ndarray] = {}
    done: dict[str, np.ndarray] = {}
    errors: dict[str, list[str]] = {}
    for j, n in enumerate(sizes):
        new = [f"x{len(ids) + i}" for i in range(n)]
        manifest = Manifest.from_columns("f", CLASSES, new, label=["a"] * n)
        store = create_store(path, manifest) if j == 0 else open_store(path, "a")
        with store:
            if j == 0:
                for name, (dtype, compressor, shape, chunk) in SETS.items():
                    store.create_feature_set(name, 2, shape, PROV, dtype=dtype, chunk_clips=chunk,
                                             compressor=compressor)
            else:
                store.append_clips(manifest)
            ids += new
            total = len(ids)
            for name, (dtype, _, shape, chunk) in SETS.items():
                grown = total - len(ref.get(name, ()))
                ref[name] = np.concatenate([ref.get(name, np.zeros((0, 2, *shape), dtype)),
                                            np.zeros((grown, 2, *shape), dtype)])
                done[name] = np.r_[done.get(name, np.zeros(0, bool)), np.zeros(grown, bool)]
                errors[name] = errors.get(name, []) + [""] * grown
                chunks = -(-total // chunk)
                for c in rng.choice(chunks, size=min(chunks, 3), replace=False).tolist():
                    start, stop = c * chunk, min(total, c * chunk + chunk * int(rng.integers(1, 3)))
                    rows = _rows(rng, dtype, (stop - start, 2, *shape))
                    mask = rng.integers(0, 4, stop - start) > 0
                    mask[0] = True
                    failed = {start + i: f"fail ü\x00 {i}" for i in np.flatnonzero(~mask)[:5].tolist()}
                    store.write_rows(name, start, rows, done=mask, errors=failed)
                    ref[name][start:stop][mask] = rows[mask].astype(dtype)
                    done[name][start:stop] = mask
                    for row in range(start, stop):
                        stored = failed.get(row, "").replace("\x00", "\\x00")  # (NUL kept as its escape)
                        errors[name][row] = stored if row in failed else "" if mask[row - start] else errors[name][row]
        root = zarr.open_group(str(path), mode="r")
        for name in SETS:
            assert root[f"features/{name}/done"][:].tolist() == done[name].tolist()
            stored = root[f"features/{name}/data"][:]
            assert stored.shape == ref[name].shape
            np.testing.assert_array_equal(stored[done[name]], ref[name][done[name]])
            assert list(root[f"features/{name}/errors"][:]) == errors[name]
        with open_store(path) as store:
            for name in SETS:
                rows = np.flatnonzero(done[name])
                np.testing.assert_array_equal(store.get_many(name, [ids[r] for r in rows]), ref[name][rows])
                np.testing.assert_array_equal(store.get(name, ids[rows[-1]]), ref[name][rows[-1]])


# ---------------------------------------------------------------------------- roll back, growth
ARRAYS = {  # (shape, dtype, chunk rows, fill, compressor, inner rows)
    "flags": ((14,), "bool", 16, False, None, None),
    "texts": ((14,), STRING, 16, "", None, None),
    "labels": ((14,), "int16", 16, -1, None, None),
    "sharded": ((14, 2), "float16", 16, 0, None, 4),
    "sharded zstd": ((14, 2), "uint8", 16, 0, "zstd", 4),
}


@pytest.mark.parametrize("kind", sorted(ARRAYS))
@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_rows_cut_off_by_a_shrink_read_as_fill_values_when_the_array_grows_again(tmp_path, kind, backend):
    """zarr's resize keeps the chunk that holds the new last row as it was; the store's growth
    writes only metadata: the cut rows must not come back (HDF5 fills them, so must Zarr)."""
    shape, dtype, rows, fill, compressor, inner = ARRAYS[kind]
    store = ZarrBackend(str(tmp_path / "s.zarr"), "w") if backend == "zarr" else HDF5Backend(str(tmp_path / "s.h5"), "w")
    store.create_array("a", shape, dtype, rows, fill, compressor=compressor, inner_rows=inner)
    written = np.full(shape, "x", dtype=object) if dtype == STRING else np.ones(shape, dtype=dtype)
    store.write("a", 0, written)
    store.resize("a", 10)
    store.resize("a", 13)
    got = store.read("a", 0, 13)
    assert got[:10].tolist() == written[:10].tolist()
    assert (got[10:] == fill).all()
    if backend == "zarr":
        store.close()
        assert (zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["a"][10:] == fill).all()


def _after_a_failed_append(path: Path, monkeypatch) -> FeatureStore:
    """A store of 10 done clips (set "f", chunks of 16) whose append of 4 more failed on a full disk
    after growing the arrays to 14 rows: the store object it failed in, still open."""
    store = create_store(path, Manifest.from_columns("r", CLASSES, [f"a{i}" for i in range(10)], label=["a"] * 10))
    store.create_feature_set("f", 1, (2,), PROV, chunk_clips=16)
    store.write_rows("f", 0, np.ones((10, 1, 2)))
    write = ZarrBackend.write

    def failing(self, array, start, data, changed=None):
        if array == "index/city":
            raise OSError(28, "No space left on device")
        return write(self, array, start, data, changed)

    monkeypatch.setattr(ZarrBackend, "write", failing)
    with pytest.raises(OSError):
        store.append_clips(Manifest.from_columns("r", CLASSES, [f"b{i}" for i in range(4)], label=["a"] * 4))
    monkeypatch.setattr(ZarrBackend, "write", write)
    return store


def test_clips_appended_after_a_roll_back_are_not_given_the_cut_rows_values(tmp_path, monkeypatch):
    """An append failed after growing the arrays; rows past the committed end were then written
    (this store object still saw them); the next writable open cuts them off, and the clips of the
    next append must start not done, not with those rows' flags and values."""
    path = tmp_path / "s.zarr"
    with _after_a_failed_append(path, monkeypatch) as store:
        with contextlib.suppress(ValueError):  # rows past the committed end: written, or refused
            store.write_rows("f", 0, np.full((14, 1, 2), 7.0))
    with open_store(path, "a") as store:
        assert store.n_clips == 10
        store.append_clips(Manifest.from_columns("r", CLASSES, ["c0", "c1", "c2"], label=["a"] * 3))
    with open_store(path) as store:
        assert store.done_mask("f")[10:].tolist() == [False] * 3
        with pytest.raises(MissingFeatureError):
            store.get("f", "c0")
    root = zarr.open_group(str(path), mode="r")
    assert root["features/f/done"][10:].tolist() == [False] * 3
    assert root["features/f/data"][10:].tolist() == [[[0.0, 0.0]]] * 3


def test_rows_an_unfinished_append_left_are_refused_and_a_later_append_finds_them_unwritten(tmp_path, monkeypatch):
    """After an append failed past growing the arrays, this store object still sees the grown arrays:
    a write reaching rows no committed clip owns is refused before anything is written, and the
    next append through the same object (growing the arrays further, metadata only) gets clips that
    are not done and hold fill values, not rows written for clips that never were."""
    path = tmp_path / "s.zarr"
    with _after_a_failed_append(path, monkeypatch) as store:
        with pytest.raises(ValueError, match="go past the store's 10 clips"):
            store.write_rows("f", 0, np.full((14, 1, 2), 7.0))
        assert store.done_mask("f").tolist() == [True] * 10
        assert store.get("f", "a0").tolist() == [[1.0, 1.0]]
        store.append_clips(Manifest.from_columns("r", CLASSES, [f"c{i}" for i in range(5)], label=["a"] * 5))
        assert store.done_mask("f")[10:].tolist() == [False] * 5
    root = zarr.open_group(str(path), mode="r")
    assert root["features/f/done"][:].tolist() == [True] * 10 + [False] * 5
    assert root["features/f/data"][10:].tolist() == [[[0.0, 0.0]]] * 5


# ------------------------------------------------------------------------------------ file writes
def test_short_writes_are_finished_in_order(tmp_path, monkeypatch):
    """A ``writev`` that writes a third of what it is given (a signal, a nearly full disk): the file
    still holds every part, in order, across batches of ``_IOV_MAX`` buffers."""
    def short(fd, buffers):
        data = b"".join(bytes(b) for b in buffers)
        return os.write(fd, data[:len(data) // 3])

    parts = [np.arange(i % 7 + 1, dtype=np.uint8) for i in range(2500)] + [b"xyz", bytearray(b"q")]
    monkeypatch.setattr(_file_writes.os, "writev", short)
    _file_writes.replace_file(str(tmp_path / "f"), parts)
    monkeypatch.undo()
    assert (tmp_path / "f").read_bytes() == b"".join(bytes(p) for p in parts)
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


@pytest.mark.parametrize("first, second", [(0, 10**6), (10**6, 0), (1, 65537)])
def test_a_kind_built_at_one_shape_has_zarrs_metadata_at_another(tmp_path, first, second):
    """A kind's metadata zarr built for an empty (or huge) array, taken over for another shape and
    grown: the JSON zarr-python writes for that shape."""
    direct, through = ZarrBackend(str(tmp_path / "d.zarr"), "w"), ZarrBackend(str(tmp_path / "z.zarr"), "w")
    through._nodes = None
    for store in (direct, through):
        for name, (shape, dtype, rows, fill, compressor, inner) in ARRAYS.items():
            store.create_array(f"{name}/x", (first, *shape[1:]), dtype, rows, fill, compressor=compressor,
                               inner_rows=inner)
            store.create_array(f"{name}/y", (second, *shape[1:]), dtype, rows, fill, compressor=compressor,
                               inner_rows=inner)
            store.resize(f"{name}/y", second + 5)
    for name in ARRAYS:
        for leaf in "xy":
            meta = [json.loads((tmp_path / f"{s}.zarr" / name / leaf / "zarr.json").read_text()) for s in "dz"]
            assert meta[0] == meta[1]
