"""Hostile search sidecars and queries: a sidecar is served only to the store, feature set and data
version it was built from; queries keep the index's float32 arithmetic; a text query reads no
class-feature values.

The stores are real files built through the public API; foreign sidecars are real files of another
store (or another feature set) copied in by hand under this key's name; answers are compared with
numpy's over the data written.
"""
from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from featurestore import TAU_CLASSES, ClipRecord, Manifest, create_store, open_store
from featurestore import text_query
from featurestore.store import _search_files as files
from featurestore.store import search as search_mod
from tests.featurestore.test_search import DIM, FEAT, N, SEG, _prov, brute_force, build
from tests.featurestore.test_search import store_path  # noqa: F401 - the fixture: a store of N done clips

needs_faiss = pytest.mark.skipif(not search_mod.faiss_available(), reason="faiss-cpu is not installed")
OTHER_SET = "clip/other"


# ----------------------------------------------------------------------------------------- helpers
def _folder(path: Path, feature_set: str = FEAT) -> Path:
    return Path(str(path) + search_mod.SIDECAR_SUFFIX).joinpath(*feature_set.split("/"))


def _expected(data: np.ndarray, row: int = 1) -> list[str]:
    """Ids nearest to clip ``row`` (itself left out), the slow way."""
    rows, _ = brute_force(data, data[row].astype(np.float64).mean(0), np.array([r for r in range(N) if r != row]))
    return [f"c{r:03d}" for r in rows]


def _fresh(path: Path, method: str, feature_set: str = FEAT, query: str = "c001", k: int = N):
    files._VERIFIED.clear()  # as in a new process
    with open_store(path) as store:  # a new store object: nothing memoised from earlier searches
        return store.search(feature_set, query, k=k, method=method)


def _copy_in(source: Path, target_folder: Path, suffixes: list[str]) -> None:
    """Replace this key's ``suffixes`` files by those of ``source`` (another folder), each renamed to
    this key (its sha256 kept, so the name still matches its bytes)."""
    key = next(target_folder.glob(f"*{suffixes[0]}")).name.split("-")[0]
    for suffix in suffixes:
        for file in target_folder.glob(f"*{suffix}"):
            file.unlink()
        for file in source.glob(f"*{suffix}"):
            (target_folder / f"{key}-{file.name.split('-', 1)[1]}").write_bytes(file.read_bytes())


def _two_sets(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """FEAT (seed 0) and OTHER_SET (seed 5): same shape and clips, other values."""
    data = build(path, seed=0)
    other = np.random.default_rng(5).standard_normal((N, SEG, DIM)).astype(np.float16)
    with open_store(path, mode="a") as store:
        store.create_feature_set(OTHER_SET, SEG, (DIM,), _prov("clip/ViT-B-32@openai"))
        store.write_rows(OTHER_SET, 0, other)
    return data, other


# --------------------------------------------------------------- sidecars of another store or set
@needs_faiss
def test_a_faiss_sidecar_of_another_store_renamed_to_this_key_is_rebuilt_not_served(tmp_path, capsys):
    mine, other = tmp_path / "a.zarr", tmp_path / "b.zarr"
    data = build(mine, seed=0)
    build(other, seed=5)  # same shape, clips and done mask; other values
    _fresh(mine, "faiss"), _fresh(other, "faiss")
    _copy_in(_folder(other), _folder(mine), [".faiss"])
    capsys.readouterr()
    result = _fresh(mine, "faiss")
    assert result.clip_ids == _expected(data), "another store's faiss index was served"
    err = capsys.readouterr().err
    assert "damaged" in err and "b.zarr" in err and "copied or renamed by hand" in err, err
    assert any(n.startswith("built the faiss index") for n in result.notes)
    again = _fresh(mine, "faiss")  # the rebuilt file is bound to this store: loaded without a build
    assert again.clip_ids == result.clip_ids and not any(n.startswith("built") for n in again.notes)


@needs_faiss
def test_a_faiss_sidecar_of_another_feature_set_of_the_store_renamed_to_this_key_is_not_served(tmp_path, capsys):
    path = tmp_path / "s.zarr"
    data, _ = _two_sets(path)
    _fresh(path, "faiss"), _fresh(path, "faiss", OTHER_SET)
    _copy_in(_folder(path, OTHER_SET), _folder(path), [".faiss"])
    capsys.readouterr()
    result = _fresh(path, "faiss")
    assert result.clip_ids == _expected(data), "another feature set's faiss index was served"
    assert f"built from feature set {OTHER_SET!r}" in capsys.readouterr().err


def _build_ivf(path: Path, seed: int, n: int = 400, dim: int = 16) -> np.ndarray:
    """``n`` clustered clips of ``dim`` (one segment): unit clip vectors by row."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, dim))
    data = (centres[np.arange(n) % 12] + 0.6 * rng.standard_normal((n, dim)))[:, None].astype(np.float16)
    clips = [ClipRecord(f"c{i:04d}", label=TAU_CLASSES[i % 10]) for i in range(n)]
    with create_store(path, Manifest("toy", list(TAU_CLASSES), clips)) as store:
        store.create_feature_set("emb", 1, (dim,), {"encoder": "test", "config": {}, "weights": {"kind": "random"}})
        store.write_rows("emb", 0, data)
    return search_mod.clip_vectors(data)


@needs_faiss
@pytest.mark.parametrize("copied", [[".faiss", ".lists"], [".faiss"]])
def test_an_ivf_index_of_another_store_renamed_to_this_key_is_not_served(tmp_path, monkeypatch, capsys, copied):
    """With its ``.lists`` manifest (the manifest names the other key's file) or alone (this key's
    manifest names a file no longer there, and the copy carries the other store's binding)."""
    monkeypatch.setattr(search_mod, "FLAT_BELOW", 100)
    mine, other = tmp_path / "a.zarr", tmp_path / "b.zarr"
    vectors = _build_ivf(mine, 0)
    _build_ivf(other, 7)
    for path in (mine, other):
        assert _fresh(path, "faiss", "emb", "c0001", 5).method == "faiss"
    _copy_in(_folder(other, "emb"), _folder(mine, "emb"), copied)
    capsys.readouterr()
    files._VERIFIED.clear()
    with open_store(mine) as store:
        result = store.search("emb", "c0001", k=5, method="faiss", nprobe=1000)  # every list: exact
    exact = np.argsort(-(vectors @ vectors[1]), kind="stable")[1:6]
    assert result.clip_ids == [f"c{r:04d}" for r in exact], "another store's IVF index was served"
    assert "damaged" in capsys.readouterr().err


def _build_ids(path: Path, prefix: str, seed: int) -> np.ndarray:
    data = np.random.default_rng(seed).standard_normal((N, SEG, DIM)).astype(np.float16)
    clips = [ClipRecord(f"{prefix}{i:03d}", label=TAU_CLASSES[i % 10]) for i in range(N)]
    with create_store(path, Manifest("toy", list(TAU_CLASSES), clips)) as store:
        store.create_feature_set(FEAT, SEG, (DIM,), _prov(), chunk_clips=8)
        store.write_rows(FEAT, 0, data)
    return data


def test_an_ids_sidecar_of_another_store_renamed_to_this_key_never_names_its_clips(tmp_path, monkeypatch, capsys):
    """Stores above IDS_ABOVE clips take the answers' ids from a ``.ids`` sidecar: one of another
    store of as many clips, renamed to this key, named that store's clips for this store's rows."""
    monkeypatch.setattr(search_mod, "IDS_ABOVE", 10)
    mine, other = tmp_path / "a.zarr", tmp_path / "b.zarr"
    data = _build_ids(mine, "a", 0)
    _build_ids(other, "zz", 0)  # same values, done mask and id width; other ids
    _fresh(mine, "exact", query="a001"), _fresh(other, "exact", query="zz001")
    _copy_in(_folder(other), _folder(mine), [".ids"])
    capsys.readouterr()
    result = _fresh(mine, "exact", query="a001")
    assert result.clip_ids == ["a" + c[1:] for c in _expected(data)], "another store's clip ids were served"
    err = capsys.readouterr().err
    assert "search ids" in err and "b.zarr" in err, err


# ------------------------------------------------------------------------------ float32 queries
def test_a_float32_query_batch_is_normalised_in_float32_without_a_float64_copy(tmp_path):
    path = tmp_path / "s.zarr"
    build(path)
    batch = np.random.default_rng(1).standard_normal((20000, DIM)).astype(np.float32)
    kept = batch.copy()
    with open_store(path) as store:
        info = store.feature_info(FEAT)
        tracemalloc.start()
        try:
            vectors, _, _ = search_mod.query_vectors(store, info, batch)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert vectors.dtype == np.float32
    # a float64 copy (2x) beside the float32 result (1x) is 3x; the float32 copy and the squares
    # np.linalg.norm makes are 2x, plus masks of a quarter each
    assert peak < 3 * batch.nbytes, f"normalising a {batch.nbytes}-byte float32 batch took {peak} bytes"
    np.testing.assert_array_equal(vectors, search_mod.unit_rows(kept.copy()))  # float32 arithmetic, bit for bit
    np.testing.assert_array_equal(batch, kept)  # the caller's array is left as it was


@pytest.mark.parametrize("method", ["exact", pytest.param("faiss", marks=needs_faiss)])
def test_a_stored_clips_float32_vector_scores_as_the_clip_itself(tmp_path, method):
    """A float32 vector query equal to a clip's search vector scores exactly as ``like`` that clip
    (both normalised in float32, as the index was), for every clip."""
    path = tmp_path / "s.zarr"
    data = build(path)
    means = data.astype(np.float32).mean(1)  # what clip_vectors takes for a float16 set
    with open_store(path) as store:
        by_vector = store.search(FEAT, means, k=5, method=method)
        by_clip = store.search(FEAT, [f"c{i:03d}" for i in range(N)], k=5, method=method, include_self=True)
    for vec, like in zip(by_vector, by_clip):
        assert vec.clip_ids == like.clip_ids
        np.testing.assert_array_equal(vec.scores, like.scores)


@pytest.mark.parametrize("query", [np.full(DIM, 1e200), [1e200] * DIM, np.full(DIM, 3e38, np.float32),
                                   np.full(DIM, 2**62, np.int64)])
def test_queries_of_any_scale_or_type_keep_their_direction(store_path, query):
    path, data = store_path
    with open_store(path) as store:
        big = store.search(FEAT, query, k=N, method="exact")
        small = store.search(FEAT, np.ones(DIM), k=N, method="exact")
    assert big.clip_ids == small.clip_ids
    np.testing.assert_allclose(big.scores, small.scores, atol=1e-6)


def test_a_query_that_is_not_numbers_is_refused_in_one_line(store_path):
    path, _ = store_path
    with open_store(path) as store:
        with pytest.raises(ValueError, match=r"^the query .* numbers"):
            store.search(FEAT, ["c001", 2.0])
        with pytest.raises(ValueError, match=r"^the query .* numbers"):
            store.search(FEAT, np.array(["c001", "c002"]))


# ------------------------------------------------------------------------ text queries' attributes
def _text_store(path: Path) -> None:
    with create_store(path, _manifest_4()) as store:
        store.create_feature_set(FEAT, 1, (4,), _prov())
        store.write_class_features("cliptext/ViT-B-32", np.ones((10, 4), np.float32), _prov("cliptext/ViT-B-32@openai"))
        store.write_class_features("prompts_rn50", np.ones((10, 4), np.float32), _prov("cliptext/RN50@openai"))


def _manifest_4() -> Manifest:
    return Manifest("toy", list(TAU_CLASSES), [ClipRecord(f"c{i:03d}", label=TAU_CLASSES[i]) for i in range(4)])


def test_the_text_tower_is_found_without_reading_any_class_feature_values(tmp_path):
    path = tmp_path / "t.zarr"
    _text_store(path)
    with open_store(path) as store:
        reads, real = [], store.arrays.read
        store.arrays.read = lambda p, *a, **kw: reads.append(p) or real(p, *a, **kw)
        spec = text_query.text_encoder_spec(store, store.feature_info(FEAT))
    assert spec == "cliptext/ViT-B-32@openai"
    assert not [p for p in reads if p.startswith("class_features/")], reads


def test_a_damaged_chunk_of_an_unrelated_class_feature_set_does_not_break_text_queries(tmp_path):
    path = tmp_path / "t.zarr"
    _text_store(path)
    chunk = next((path / "class_features" / "prompts_rn50" / "data").glob("c*"))
    chunk.write_bytes(b"\0" * chunk.stat().st_size)
    with open_store(path) as store:
        with pytest.raises(Exception):  # the damage is real: reading that set's values fails
            store.get_class_features("prompts_rn50")
        assert text_query.text_encoder_spec(store, store.feature_info(FEAT)) == "cliptext/ViT-B-32@openai"
