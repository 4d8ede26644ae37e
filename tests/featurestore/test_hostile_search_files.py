"""Hostile search: every answer is the brute-force answer over the rows the store holds now, or a
one-line refusal; never neighbours or scores from a sidecar built for other data.

Each test changes the store (rows written again, rows failed, a set deleted and made again, clips
appended, a second store object, another backend) or the sidecar (files of another store renamed
to this key, two processes building at once, an unwritable directory holding a stale index), or
asks odd queries (scales whose squares leave float32, complex numbers, bad ``k``/``nprobe``), and
compares the answer with numpy over the data it wrote.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from featurestore import TAU_CLASSES, ClipRecord, Manifest, create_store, open_store
from featurestore.store import search as search_mod
from tests.featurestore.test_search import DIM, FEAT, N, SEG, _manifest, _prov, brute_force, build
from tests.featurestore.test_search_sidecars import _read_only

ROOT = Path(__file__).resolve().parents[2]
needs_faiss = pytest.mark.skipif(not search_mod.faiss_available(), reason="faiss-cpu is not installed")
METHODS = ["exact", pytest.param("faiss", marks=needs_faiss)]


# ----------------------------------------------------------------------------------------- helpers
def _folder(path: Path) -> Path:
    return Path(str(path) + search_mod.SIDECAR_SUFFIX) / "clip" / "ViT-B-32"


def _expected(data: np.ndarray, row: int, done: np.ndarray | None = None, k: int = N) -> list[str]:
    """Ids nearest to clip ``row`` (itself left out) among the ``done`` rows, the slow way."""
    done = np.ones(len(data), dtype=bool) if done is None else done
    rows = np.array([r for r in np.flatnonzero(done) if r != row])
    found, _ = brute_force(data, data[row].astype(np.float64).mean(0), rows)
    return [f"c{r:03d}" for r in found[:k]]


def _fresh(path: Path, query: str = "c001", method: str = "exact", **kwargs) -> search_mod.SearchResult:
    with open_store(path) as store:  # a new store object: nothing memoised from earlier searches
        return store.search(FEAT, query, k=N, method=method, **kwargs)


def _other_values(seed: int, rows: int = N) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, SEG, DIM)).astype(np.float16)


# ------------------------------------------------------------------- the data changes under the index
@pytest.mark.parametrize("undo", ["set_errors", "write_not_done"])
@pytest.mark.parametrize("method", METHODS)
def test_rows_failed_then_written_again_with_other_values_are_not_served_from_the_old_index(tmp_path, undo, method):
    path = tmp_path / "s.zarr"
    data = build(path)
    assert _fresh(path, method=method).clip_ids == _expected(data, 1)  # the sidecar of the old values
    new = data.copy()
    new[:8] = _other_values(5, 8)
    new[2] = new[1]  # c002 becomes c001's twin: the right answer starts with it
    with open_store(path, mode="a") as store:
        if undo == "set_errors":
            store.set_errors(FEAT, {r: "decode failed" for r in range(8)})
        else:  # the same values, marked not done (a retry's bookkeeping)
            store.write_rows(FEAT, 0, data[:8], done=np.zeros(8, dtype=bool))
        store.write_rows(FEAT, 0, new[:8])  # extracted again, other values
        assert store.done_mask(FEAT).all()
        same_object = store.search(FEAT, "c001", k=N, method=method)
    assert _expected(new, 1)[0] == "c002"
    assert same_object.clip_ids == _expected(new, 1), "the writer's own store object served the old index"
    assert _fresh(path, method=method).clip_ids == _expected(new, 1), "a new store object served the old sidecar"


@pytest.mark.parametrize("method", METHODS)
def test_a_reader_sees_rows_rewritten_by_another_store_object_after_refresh(tmp_path, method):
    path = tmp_path / "s.zarr"
    data = build(path)
    new = _other_values(11)
    with open_store(path) as reader:
        before = reader.search(FEAT, "c001", k=N, method=method)
        assert before.clip_ids == _expected(data, 1)
        with open_store(path, mode="a") as writer:
            writer.write_rows(FEAT, 0, new)
        reader.refresh()
        after = reader.search(FEAT, "c001", k=N, method=method)
    assert after.clip_ids == _expected(new, 1) != before.clip_ids
    np.testing.assert_allclose(after.scores, brute_force(new, new[1].astype(np.float64).mean(0),
                                                         np.array([r for r in range(N) if r != 1]))[1], atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_failed_clips_leave_the_answers_at_once_and_come_back_when_written(tmp_path, method):
    path = tmp_path / "s.zarr"
    data = build(path)
    done = np.ones(N, dtype=bool)
    with open_store(path, mode="a") as store:
        store.search(FEAT, "c001", k=N, method=method)  # memo and sidecar of every clip
        store.set_errors(FEAT, {"c003": "gone", 17: "gone"})
        done[[3, 17]] = False
        failed = store.search(FEAT, "c001", k=N, method=method)
        assert failed.clip_ids == _expected(data, 1, done)
        assert _fresh(path, method=method).clip_ids == _expected(data, 1, done)
        with pytest.raises(Exception, match="c003"):
            store.search(FEAT, "c003", method=method)  # not done: no query either
        store.write_rows(FEAT, 0, data[:8])  # c003 done again, the same values
        done[3] = True
        assert store.search(FEAT, "c001", k=N, method=method).clip_ids == _expected(data, 1, done)
    assert _fresh(path, method=method).clip_ids == _expected(data, 1, done)


@pytest.mark.parametrize("shape", ["other_shape", "same_shape"])
def test_a_set_deleted_and_made_again_is_searched_as_it_is_now(tmp_path, shape):
    path = tmp_path / "s.zarr"
    build(path)
    seg, dim = (2, 5) if shape == "other_shape" else (SEG, DIM)
    new = np.random.default_rng(3).standard_normal((N, seg, dim)).astype(np.float16)
    done = np.zeros(N, dtype=bool)
    done[:16] = True
    with open_store(path, mode="a") as store:
        store.search(FEAT, "c001", k=N)
        store.delete_feature_set(FEAT)
        store.create_feature_set(FEAT, seg, (dim,), _prov(), chunk_clips=8)
        store.write_rows(FEAT, 0, new[:16])
        again = store.search(FEAT, "c001", k=N)
        if shape == "other_shape":
            with pytest.raises(ValueError, match=r"shape \[8\]; the feature set's embeddings have 5"):
                store.search(FEAT, np.ones(DIM))
    assert again.clip_ids == _expected(new, 1, done)
    assert _fresh(path).clip_ids == _expected(new, 1, done)


def test_clips_appended_by_another_object_join_once_done_never_before(tmp_path):
    path = tmp_path / "s.zarr"
    data = build(path)
    more = Manifest("toy", list(TAU_CLASSES), [ClipRecord(f"c{i:03d}", label=TAU_CLASSES[i % 10], city="x",
                                                          location=f"x-{i}", splits=frozenset({"train"}))
                                               for i in range(N, N + 16)])
    extra = _other_values(21, 16)
    with open_store(path) as reader:
        reader.search(FEAT, "c001", k=N)
        with open_store(path, mode="a") as writer:
            writer.append_clips(more)
            writer.write_rows(FEAT, N, extra[:8])  # c040..c047 done, c048..c055 not
        reader.refresh()
        result = reader.search(FEAT, "c001", k=10 * N)
    both = np.concatenate([data, extra])
    done = np.arange(N + 16) < N + 8
    assert result.clip_ids == _expected(both, 1, done, k=10 * N)
    assert not {f"c{i:03d}" for i in range(N + 8, N + 16)} & set(result.clip_ids)


@pytest.mark.parametrize("method", METHODS)
def test_the_hdf5_backend_rebuilds_after_a_rewrite_and_leaves_failed_clips_out(tmp_path, method):
    path = tmp_path / "s.h5"
    data = _other_values(0)
    with create_store(path, _manifest(N)) as store:
        store.create_feature_set(FEAT, SEG, (DIM,), _prov(), chunk_clips=8)
        store.write_rows(FEAT, 0, data)
    assert _fresh(path, method=method).clip_ids == _expected(data, 1)
    new = _other_values(4)
    with open_store(path, mode="a") as store:
        store.write_rows(FEAT, 0, new)
        store.set_errors(FEAT, {"c009": "x"})
    done = np.arange(N) != 9
    result = _fresh(path, method=method)
    assert result.clip_ids == _expected(new, 1, done)
    assert any(n.startswith("built ") for n in result.notes), result.notes
    assert _folder(path).is_dir() and _fresh(path, method=method).notes == []  # kept, then reused


# ------------------------------------------------------------------------------ the sidecar files
@pytest.mark.parametrize("ext", [".json"])  # (a .faiss file carries no key: not caught, docs/store.md)
def test_sidecar_files_of_another_store_renamed_to_this_key_are_not_served(tmp_path, capsys, ext):
    method = "exact" if ext == ".json" else "faiss"
    mine, other = tmp_path / "a.zarr", tmp_path / "b.zarr"
    data = build(mine, seed=0)
    build(other, seed=5)  # same shape, clips and done mask; other values
    _fresh(mine, method=method), _fresh(other, method=method)
    key = next(_folder(mine).glob(f"*{ext}")).name.split("-")[0]
    for suffix in ([".json", ".npy"] if ext == ".json" else [".faiss", ".lists"]):
        for file in _folder(mine).glob(f"*{suffix}"):
            file.unlink()
        for file in _folder(other).glob(f"*{suffix}"):  # the same sha256, this store's key
            (_folder(mine) / f"{key}-{file.name.split('-', 1)[1]}").write_bytes(file.read_bytes())
    capsys.readouterr()
    result = _fresh(mine, method=method)
    assert result.clip_ids == _expected(data, 1), "another store's index was served"
    assert "damaged" in capsys.readouterr().err


def test_a_copied_sidecar_directory_of_another_store_is_ignored_and_cleaned(tmp_path):
    mine, other = tmp_path / "a.zarr", tmp_path / "b.zarr"
    data = build(mine, seed=0)
    build(other, seed=5)
    _fresh(other)
    Path(str(other) + search_mod.SIDECAR_SUFFIX).rename(Path(str(mine) + search_mod.SIDECAR_SUFFIX))
    foreign = {p.name for p in _folder(mine).iterdir()}
    result = _fresh(mine)
    assert result.clip_ids == _expected(data, 1)
    assert any(n.startswith("built ") for n in result.notes)
    assert not foreign & {p.name for p in _folder(mine).iterdir()}  # the other store's files are gone


@pytest.mark.parametrize("method", METHODS)
def test_an_unwritable_sidecar_holding_a_stale_index_answers_from_the_store(tmp_path, capsys, method):
    path = tmp_path / "s.zarr"
    build(path)
    _fresh(path, method=method)
    new = _other_values(8)
    with open_store(path, mode="a") as store:
        store.write_rows(FEAT, 0, new)
    stale = sorted(p.name for p in _folder(path).iterdir())
    with _read_only(_folder(path)):
        capsys.readouterr()
        result = _fresh(path, method=method)
        assert sorted(p.name for p in _folder(path).iterdir()) == stale
    assert result.clip_ids == _expected(new, 1)
    assert not any("saved to" in n for n in result.notes), result.notes
    assert "searching in memory" in capsys.readouterr().err


_CHILD = """
import json, sys
from featurestore import open_store
with open_store(sys.argv[1]) as store:
    result = store.search("clip/ViT-B-32", "c001", k=40, method=sys.argv[2])
print(json.dumps(result.clip_ids))
"""


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_building_the_sidecar_at_once_both_answer_right_and_leave_one_set_of_files(
        tmp_path, method):
    path = tmp_path / "s.zarr"
    data = build(path, n=N)
    children = [subprocess.Popen([sys.executable, "-c", _CHILD, str(path), method], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        assert json.loads(out) == _expected(data, 1)
        assert "damaged" not in err, err
    suffixes = sorted(p.suffix for p in _folder(path).iterdir())
    assert suffixes == ([".json", ".npy"] if method == "exact" else [".faiss", ".json", ".npy"]), suffixes
    assert _fresh(path, method=method).notes == []  # what they left is whole: loaded, not rebuilt


# ------------------------------------------------------------------------------------- the queries
@pytest.mark.parametrize("method", METHODS)
def test_a_query_vector_of_any_scale_gets_the_answer_of_its_direction(tmp_path, method):
    """Cosine does not depend on scale; float32 squares of 1e20 overflow and of 1e-25 underflow."""
    path = tmp_path / "s.zarr"
    data = build(path)
    query = data[7].astype(np.float64).mean(0)
    rows, scores = brute_force(data, query, np.arange(N))
    with open_store(path) as store:
        for scaled in (query.astype(np.float32) * np.float32(1e20), query.astype(np.float32) * np.float32(1e-25),
                       query * 1e200, query * 1e-300, np.stack([query * 1e30, query])):
            got = store.search(FEAT, scaled, k=5, method=method)
            for one in (got if isinstance(got, list) else [got]):
                assert one.clip_ids == [f"c{r:03d}" for r in rows[:5]], scaled
                np.testing.assert_allclose(one.scores, scores[:5], atol=1e-5)


@pytest.mark.parametrize("scale", [1e20, 1e-23])
def test_stored_values_whose_squares_leave_float32_are_searched_by_their_direction(tmp_path, scale):
    path = tmp_path / "big.zarr"
    raw = np.random.default_rng(2).standard_normal((N, SEG, DIM))
    data = (raw * scale).astype(np.float32)
    with create_store(path, _manifest(N)) as store:
        store.create_feature_set(FEAT, SEG, (DIM,), _prov(), dtype="float32", chunk_clips=8)
        store.write_rows(FEAT, 0, data)
    result = _fresh(path)
    assert result.clip_ids == _expected(data, 1)
    expected = brute_force(data, data[1].astype(np.float64).mean(0), np.array([r for r in range(N) if r != 1]))[1]
    np.testing.assert_allclose(result.scores, expected, atol=1e-5)
    assert _fresh(path).clip_ids == result.clip_ids  # the sidecar passes its own unit-vector check


@pytest.mark.parametrize("dtype", ["int8", "float64"])
def test_other_dtypes_and_several_segments_are_reduced_to_the_mean(tmp_path, dtype):
    path = tmp_path / "d.zarr"
    raw = np.random.default_rng(6).standard_normal((N, 5, DIM))
    data = (raw * 40).astype(dtype) if dtype == "int8" else raw * 1e150  # beyond float32, squares within float64
    with create_store(path, _manifest(N)) as store:
        store.create_feature_set(FEAT, 5, (DIM,), _prov(), dtype=dtype, chunk_clips=8)
        store.write_rows(FEAT, 0, data)
    result = _fresh(path)
    assert not any("non-finite" in n for n in result.notes), result.notes
    assert result.clip_ids == _expected(data, 1)


def test_bad_k_nprobe_and_query_values_are_refused_in_one_line(tmp_path):
    path = tmp_path / "s.zarr"
    data = build(path)
    bad = [dict(k=None), dict(k=2.7), dict(k=True), dict(k=-1), dict(nprobe=-1), dict(nprobe=0), dict(nprobe=2.5)]
    with open_store(path) as store:
        for kwargs in bad:
            kwargs = {"k": 3, **kwargs}
            with pytest.raises(ValueError) as raised:
                store.search(FEAT, "c001", method="faiss" if search_mod.faiss_available() else "exact", **kwargs)
            assert "\n" not in str(raised.value) and ("k must" in str(raised.value) or "nprobe" in str(raised.value))
        with pytest.raises(ValueError, match="complex"):
            store.search(FEAT, data[1].astype(np.float32).mean(0) * 1j + 1)
        for refused in (np.zeros(DIM), np.full(DIM, np.nan), np.stack([np.ones(DIM), np.full(DIM, np.inf)]),
                        np.full(DIM, np.inf), np.ones((1, 1, DIM)), np.ones((0, DIM))):
            with pytest.raises(ValueError) as raised:
                store.search(FEAT, refused)
            assert "\n" not in str(raised.value)
        assert len(store.search(FEAT, np.ones((1, DIM)), k=3)) == 1  # a 1-row matrix is a batch of one
        one = store.search(FEAT, np.ones(DIM, dtype=np.int64), k=N)
        assert one.clip_ids == [f"c{r:03d}" for r in brute_force(data, np.ones(DIM), np.arange(N))[0]]


@pytest.mark.parametrize("method", METHODS)
def test_k_beyond_the_done_clips_returns_each_done_clip_once(tmp_path, method):
    path = tmp_path / "s.zarr"
    data = build(path, done=24)
    with open_store(path) as store:
        result = store.search(FEAT, "c003", k=10**9, method=method)
        batch = store.search(FEAT, ["c003", "c003", "c005"], k=10**9, method=method, include_self=True)
    done = np.arange(N) < 24
    assert result.clip_ids == _expected(data, 3, done)
    assert [len(b.clip_ids) for b in batch] == [24, 24, 24]
    assert batch[0].clip_ids == batch[1].clip_ids and batch[0].clip_ids[0] == "c003"
    assert all(set(b.clip_ids) == {f"c{i:03d}" for i in range(24)} for b in batch)


def test_the_approximate_path_keeps_its_recall_after_the_data_changes(tmp_path, monkeypatch):
    """auto above APPROX_ABOVE (lowered here) is an IVF index: recall@10 against exact before and after
    a rewrite, and the index of the old values is not what answers."""
    pytest.importorskip("faiss")
    monkeypatch.setattr(search_mod, "APPROX_ABOVE", 100)
    monkeypatch.setattr(search_mod, "FLAT_BELOW", 100)
    path = tmp_path / "ivf.zarr"
    build(path, n=800, seed=1)
    new = np.random.default_rng(12).standard_normal((800, SEG, DIM)).astype(np.float16)
    queries = [f"c{i:03d}" for i in range(0, 800, 40)]
    for step in ("before", "after"):
        if step == "after":
            with open_store(path, mode="a") as store:
                store.write_rows(FEAT, 0, new)
        with open_store(path) as store:
            auto = store.search(FEAT, queries, k=10)
            exact = store.search(FEAT, queries, k=10, method="exact")
        assert {a.method for a in auto} == {"faiss"}
        recall = np.mean([len(set(a.clip_ids) & set(e.clip_ids)) / 10 for a, e in zip(auto, exact)])
        assert recall >= 0.9, (step, recall)
        for a, e in zip(auto, exact):  # every score is the exact cosine of the clip it names
            scores = dict(zip(e.clip_ids, e.scores))
            for clip, score in zip(a.clip_ids, a.scores):
                if clip in scores:
                    assert abs(scores[clip] - score) < 1e-4
