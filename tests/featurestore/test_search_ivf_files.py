"""An IVF faiss index opens in a new process without reading its lists (issue 23 item 3): its ``.lists``
manifest promises the crc32 of each list, and a list is checked when a query first probes it.

Before, every new process hashed the whole index file (sha256) and had faiss read it whole: 2 GiB and
seconds at a million clips. The stores here are real files built through the public API; damage is
real bytes flipped in the files the search wrote; answers are compared with numpy's exact ones.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from featurestore import TAU_CLASSES, ClipRecord, Manifest, create_store, open_store
from featurestore.store import _search_files as files
from featurestore.store import search as search_mod

pytestmark = pytest.mark.skipif(not search_mod.faiss_available(), reason="faiss-cpu is not installed")
FEAT, N, DIM = "clip/test", 2000, 32


def _build(path: Path) -> np.ndarray:
    """N clips x 1 x DIM float16 in 30 clusters; returns the unit clip vectors (float32) by row."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((30, DIM))
    data = (centres[np.arange(N) % 30] + 0.6 * rng.standard_normal((N, DIM)))[:, None].astype(np.float16)
    clips = [ClipRecord(f"c{i:04d}", label=TAU_CLASSES[i % 10]) for i in range(N)]
    with create_store(path, Manifest("toy", list(TAU_CLASSES), clips)) as store:
        store.create_feature_set(FEAT, 1, (DIM,), {"encoder": "test", "config": {}, "weights": {"kind": "random"}})
        store.write_rows(FEAT, 0, data)
    return search_mod.clip_vectors(data)


def _read_chars() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


def _sidecar(path: Path, suffix: str) -> Path:
    found = sorted((Path(str(path) + search_mod.SIDECAR_SUFFIX) / "clip" / "test").glob(f"*{suffix}"))
    assert len(found) == 1, found
    return found[0]


@pytest.fixture
def ivf_store(tmp_path, monkeypatch):
    """A store whose faiss index is an IVF one (FLAT_BELOW lowered: N clips give 51 lists), built and saved."""
    monkeypatch.setattr(search_mod, "FLAT_BELOW", 100)
    path = tmp_path / "s.zarr"
    vectors = _build(path)
    with open_store(path) as store:
        built = search_mod.faiss_index(store, FEAT)
        assert built.nlist > 8 and built.lists is None  # built here: every list is in memory already
    return path, vectors


def test_a_new_process_maps_the_ivf_index_and_checks_only_the_lists_its_query_probes(ivf_store):
    path, vectors = ivf_store
    size = _sidecar(path, ".faiss").stat().st_size
    files._VERIFIED.clear()  # as in a new process
    with open_store(path) as store:
        search_mod.set_key(store, FEAT, "faiss")  # the store's own reads (done mask, labels) come first
        before = _read_chars()
        index = search_mod.faiss_index(store, FEAT)
        read = _read_chars() - before
        assert read < size / 4, f"opening read {read} bytes of a {size}-byte index file"
        assert index.lists is not None and not index.lists.checked
        result = store.search(FEAT, "c0001", k=5, method="faiss")
        assert 0 < len(index.lists.checked) <= index.default_nprobe < index.nlist
    exact = np.argsort(-(vectors @ vectors[1]), kind="stable")[1:6]
    assert result.clip_ids == [f"c{r:04d}" for r in exact]
    assert not any(n.startswith("built") for n in result.notes)


@pytest.mark.parametrize("damage", ["a vector of a probed list", "the quantizer", "the manifest's size"])
def test_damage_in_an_ivf_index_file_is_never_served_and_the_index_is_rebuilt(ivf_store, capsys, damage):
    path, vectors = ivf_store
    index_file, manifest_file = _sidecar(path, ".faiss"), _sidecar(path, ".lists")
    raw, manifest = bytearray(index_file.read_bytes()), json.loads(manifest_file.read_text())
    if damage == "a vector of a probed list":  # clip 1's own list: the first one its query probes
        at = bytes(raw).find(vectors[1].astype(np.float32).tobytes(), manifest["data_start"])
        assert at > 0
        raw[at + 3] ^= 0x40
    elif damage == "the quantizer":
        raw[manifest["data_start"] // 2] ^= 0x40
    else:
        raw = raw[:-8]
    index_file.write_bytes(bytes(raw))
    capsys.readouterr()
    with open_store(path) as store:
        index = store.search(FEAT, "c0001", k=5, method="faiss", nprobe=1000)  # every list: exact
    err = capsys.readouterr().err
    assert "is damaged" in err and err.count("warning") == 1, err
    assert any(n.startswith("built the faiss index") for n in index.notes)
    exact = np.argsort(-(vectors @ vectors[1]), kind="stable")[1:6]
    assert index.clip_ids == [f"c{r:04d}" for r in exact] and float(np.max(index.scores)) <= 1 + 1e-5
    assert _sidecar(path, ".faiss").read_bytes() != bytes(raw)
    with open_store(path) as store:  # the rebuilt files load without a warning
        again = store.search(FEAT, "c0001", k=5, method="faiss", nprobe=1000)
    assert again.clip_ids == index.clip_ids and not any(n.startswith("built") for n in again.notes)
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("method", ["exact", "faiss"])
def test_a_first_search_reads_the_feature_sets_info_once(ivf_store, monkeypatch, method):
    """``feature_info`` reads the whole done mask (a third of a second at a million clips): a new
    process's first query reads it once, not once more per sidecar it loads."""
    from featurestore.store.store import FeatureStore

    path, _ = ivf_store
    real, calls = FeatureStore.feature_info, []
    monkeypatch.setattr(FeatureStore, "feature_info", lambda self, name: calls.append(name) or real(self, name))
    with open_store(path) as store:
        result = store.search(FEAT, "c0001", k=5, method=method)
    assert result.method == method and not any(n.startswith("built") for n in result.notes)
    assert calls == [FEAT]


def _counting_id_reads(store) -> list[int]:
    """Rows of ``index/clip_id`` read through the store from now on (one entry per read)."""
    rows, read = [], store.arrays.read

    def counted(path, start, stop, **kwargs):
        if path == "index/clip_id":
            rows.append(stop - start)
        return read(path, start, stop, **kwargs)

    store.arrays.read = counted
    return rows


@pytest.mark.parametrize("damaged", [False, True])
def test_answers_take_their_ids_from_the_ids_sidecar_not_the_id_column(ivf_store, monkeypatch, capsys, damaged):
    """At a million clips a first query decoded a 65,536-id block of the id column per answer (2-3 s):
    stores above IDS_ABOVE clips keep their ids in a checked ``.ids`` sidecar (lowered here to N / 20)."""
    monkeypatch.setattr(search_mod, "IDS_ABOVE", 100)
    monkeypatch.setattr(search_mod, "ID_BLOCK_ROWS", 64)
    path, vectors = ivf_store
    exact = [f"c{r:04d}" for r in np.argsort(-(vectors @ vectors[1]), kind="stable")[1:6]]
    with open_store(path) as store:
        assert store.search(FEAT, "c0001", k=5, method="faiss", nprobe=1000).clip_ids == exact  # writes it
    ids_file = _sidecar(path, ".ids")
    if damaged:
        raw = bytearray(ids_file.read_bytes())
        raw[-3] ^= 0x01
        ids_file.write_bytes(bytes(raw))
    files._VERIFIED.clear()  # as in a new process
    capsys.readouterr()
    with open_store(path) as store:
        reads = _counting_id_reads(store)
        result = store.search(FEAT, "c0001", k=5, method="faiss", nprobe=1000)
    assert result.clip_ids == exact
    err = capsys.readouterr().err
    if damaged:  # reported once, the answer's ids from the store, the file written again whole
        assert "search ids" in err and "damaged" in err and err.count("warning") == 1, err
        assert sum(reads) == N and _sidecar(path, ".ids").read_bytes() != bytes(raw)
    else:
        assert reads == [] and err == ""


def test_an_ivf_index_saved_without_a_lists_manifest_is_checked_whole_once_and_given_one(ivf_store):
    """An index file from before the manifests (or whose manifest was lost) is hashed whole as before,
    and then gets its manifest: the next process maps it instead of reading it."""
    path, vectors = ivf_store
    _sidecar(path, ".lists").unlink()
    files._VERIFIED.clear()
    with open_store(path) as store:
        first = store.search(FEAT, "c0001", k=5, method="faiss")
        assert search_mod.faiss_index(store, FEAT).lists is None  # read and checked whole
    assert _sidecar(path, ".lists").exists()
    files._VERIFIED.clear()
    with open_store(path) as store:
        again = store.search(FEAT, "c0001", k=5, method="faiss")
        assert search_mod.faiss_index(store, FEAT).lists is not None
    assert again.clip_ids == first.clip_ids and not any(n.startswith("built") for n in again.notes + first.notes)
