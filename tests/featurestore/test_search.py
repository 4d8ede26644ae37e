"""Search over stored embeddings: exact and faiss answers, the sidecar index, text queries, the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from featurestore import TAU_CLASSES, ClipRecord, Manifest, create_store, open_store
from featurestore.cli import main
from featurestore.errors import MissingFeatureError, UnknownClipError, UnknownFeatureError
from featurestore import text_query
from featurestore.store import search as search_mod

N, SEG, DIM, CHUNK = 40, 3, 8, 8
FEAT = "clip/ViT-B-32"


def _prov(encoder: str = "clip/ViT-B-32@openai", weights: dict | None = None) -> dict:
    return {"encoder": encoder, "config": {}, "weights": weights or {"kind": "pretrained", "tag": "openai"}}


def _manifest(n: int) -> Manifest:
    clips = [ClipRecord(f"c{i:03d}", label=TAU_CLASSES[i % 10] if i % 7 else None, city="x", location=f"x-{i}",
                        splits=frozenset({"train" if i % 2 else "test"})) for i in range(n)]
    return Manifest("toy", list(TAU_CLASSES), clips)


def build(path: Path, n: int = N, done: int | None = None, seed: int = 0) -> np.ndarray:
    """``n`` clips of random embeddings; rows ``done:`` are left not computed (default: all done)."""
    data = np.random.default_rng(seed).standard_normal((n, SEG, DIM)).astype(np.float16)
    with create_store(path, _manifest(n)) as store:
        store.create_feature_set(FEAT, SEG, (DIM,), _prov(), chunk_clips=CHUNK)
        store.write_rows(FEAT, 0, data[:done] if done is not None else data)
    return data


def brute_force(data: np.ndarray, query: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine of clip means, the slow way, over ``rows``: (rows best first, scores)."""
    means = data.astype(np.float64).mean(1)
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    q = query / np.linalg.norm(query)
    scores = means[rows] @ q
    order = np.argsort(-scores, kind="stable")
    return rows[order], scores[order]


@pytest.fixture
def store_path(tmp_path):
    path = tmp_path / "s.zarr"
    return path, build(path)


def test_like_returns_the_cosine_nearest_clip_means_without_the_clip_itself(store_path):
    path, data = store_path
    with open_store(path) as store:
        result = store.search(FEAT, "c005", k=5)
        labels = store.labels
    others = np.array([r for r in range(N) if r != 5])
    rows, scores = brute_force(data, data[5].astype(np.float64).mean(0), others)
    assert result.clip_ids == [f"c{r:03d}" for r in rows[:5]]
    np.testing.assert_allclose(result.scores, scores[:5], atol=1e-5)
    assert result.labels == [TAU_CLASSES[labels[r]] if labels[r] >= 0 else None for r in rows[:5]]
    assert result.method == "exact" and result.query == {"like": "c005"}


def test_include_self_puts_the_clip_first_with_score_one(store_path):
    path, _ = store_path
    with open_store(path) as store:
        result = store.search(FEAT, "c005", k=3, include_self=True)
    assert result.clip_ids[0] == "c005" and abs(result.scores[0] - 1.0) < 1e-5


def test_a_vector_query_and_k_larger_than_the_store(store_path):
    path, data = store_path
    with open_store(path) as store:
        result = store.search(FEAT, data[7].astype(np.float32).mean(0), k=100)
    assert len(result.clip_ids) == N and result.clip_ids[0] == "c007"
    assert np.all(np.diff(result.scores) <= 1e-6)


def test_clips_not_done_are_never_returned_and_cannot_be_queried(tmp_path):
    path = tmp_path / "part.zarr"
    data = build(path, done=24)
    with open_store(path) as store:
        result = store.search(FEAT, "c003", k=N)
        assert sorted(result.clip_ids) == sorted(f"c{i:03d}" for i in range(24) if i != 3)
        with pytest.raises(MissingFeatureError, match="c030"):
            store.search(FEAT, "c030")
    rows, _ = brute_force(data, data[3].astype(np.float64).mean(0), np.array([r for r in range(24) if r != 3]))
    assert result.clip_ids == [f"c{r:03d}" for r in rows]


def test_bad_queries_are_refused_naming_what_was_wrong(store_path):
    path, _ = store_path
    with open_store(path) as store:
        with pytest.raises(UnknownClipError, match="c999"):
            store.search(FEAT, "c999")
        with pytest.raises(UnknownFeatureError, match="clip/RN101"):
            store.search("clip/RN101", "c001")
        with pytest.raises(ValueError, match=r"shape \[5\]; the feature set's embeddings have 8"):
            store.search(FEAT, np.ones(5))
        with pytest.raises(ValueError, match=r"give a query"):
            store.search(FEAT, [])
        with pytest.raises(ValueError, match="method"):
            store.search(FEAT, "c001", method="annoy")


def test_the_clip_matrix_is_kept_beside_the_store_and_rebuilt_when_the_set_changes(tmp_path):
    path = tmp_path / "grow.zarr"
    data = build(path, done=16)
    with open_store(path) as store:
        first = store.search(FEAT, "c001", k=N)
    assert any("built the clip matrix" in n for n in first.notes)
    files = list((Path(str(path) + ".search") / "clip" / "ViT-B-32").glob("*.npy"))
    assert len(files) == 1
    with open_store(path) as store:  # a fresh store object: read from the sidecar, nothing built
        again = store.search(FEAT, "c001", k=N)
    assert again.notes == [] and again.clip_ids == first.clip_ids
    with open_store(path, mode="a") as store:
        store.write_rows(FEAT, 16, data[16:])
    with open_store(path) as store:
        grown = store.search(FEAT, "c001", k=N)
    assert any("built the clip matrix" in n for n in grown.notes)
    assert len(grown.clip_ids) == N - 1 and "c030" in grown.clip_ids
    assert [p.name for p in files[0].parent.glob("*.npy")] != [files[0].name]  # the stale one is gone
    assert len(list(files[0].parent.glob("*.npy"))) == 1 and len(list(files[0].parent.glob("*.json"))) == 1


def test_faiss_flat_and_ivf_agree_with_exact(tmp_path, monkeypatch):
    pytest.importorskip("faiss")
    monkeypatch.setattr(search_mod, "FLAT_BELOW", 100)  # 2000 clips -> an IVF index of 2000 // 39 = 51 lists
    path = tmp_path / "ivf.zarr"
    build(path, n=2000, seed=1)
    with open_store(path) as store:
        exact = store.search(FEAT, "c010", k=10, method="exact")
        ivf = store.search(FEAT, "c010", k=10, method="faiss", nprobe=51)  # every list: exact answer
        assert any("nlist 51" in n for n in ivf.notes)
        assert ivf.clip_ids == exact.clip_ids and ivf.method == "faiss"
        np.testing.assert_allclose(ivf.scores, exact.scores, atol=1e-5)
        calibrated = search_mod.faiss_index(store, FEAT).default_nprobe
        queries = store.clip_ids[::50]
        hits = sum(len(set(store.search(FEAT, q, method="faiss").clip_ids) & set(store.search(FEAT, q).clip_ids))
                   for q in queries)
        assert hits / (10 * len(queries)) >= 0.9  # the calibrated nprobe keeps its recall promise
    with open_store(path) as store:  # read back from the sidecar with the calibrated nprobe
        assert search_mod.faiss_index(store, FEAT).default_nprobe == calibrated and 1 <= calibrated <= 51
    small = tmp_path / "flat.zarr"
    build(small)
    with open_store(small) as store:
        assert store.search(FEAT, "c002", method="faiss").clip_ids == store.search(FEAT, "c002").clip_ids


def test_auto_falls_back_to_exact_with_a_note_when_faiss_is_missing(store_path, monkeypatch):
    path, _ = store_path
    monkeypatch.setattr(search_mod, "APPROX_ABOVE", 0)  # every set counts as "large"
    monkeypatch.setattr(search_mod, "faiss_available", lambda: False)
    with open_store(path) as store:
        result = store.search(FEAT, "c001")
        assert result.method == "exact" and any("faiss-cpu is not installed" in n for n in result.notes)
        with pytest.raises(ValueError, match="needs faiss-cpu"):
            store.search(FEAT, "c001", method="faiss")


# ------------------------------------------------------------------------------------ text queries
def test_the_text_tower_follows_the_recorded_weights(tmp_path):
    path = tmp_path / "t.zarr"
    with create_store(path, _manifest(4)) as store:
        for name, weights in (("clip/RN101", {"kind": "random", "seed": 3}),
                              ("clip/RN50", {"kind": "file", "path": "/ckpt/rn50.pt", "sha256": "ab"}),
                              ("timm/resnet18", None)):
            enc = name + ("@none:3" if weights and weights["kind"] == "random" else "")
            store.create_feature_set(name, 1, (4,), _prov(enc, weights))
        store.create_feature_set(FEAT, 1, (4,), _prov())
        store.write_class_features("cliptext/ViT-B-32", np.ones((10, 4), np.float32),
                                   _prov("cliptext/ViT-B-32@/ckpt/text.pt", {"kind": "file", "path": "/ckpt/text.pt",
                                                                            "sha256": "cd"}))
        spec = lambda name: text_query.text_encoder_spec(store, store.feature_info(name))  # noqa: E731
        assert spec("clip/RN101") == "cliptext/RN101@none:3"
        assert spec("clip/RN50") == "cliptext/RN50@/ckpt/rn50.pt"
        assert spec(FEAT) == "cliptext/ViT-B-32@/ckpt/text.pt"  # the stored class features' tower wins
        with pytest.raises(ValueError, match="no CLIP text tower"):
            spec("timm/resnet18")


def test_the_text_tower_of_a_chosen_name_matches_its_weights(tmp_path):
    """Two weight choices of one CLIP model in one store: each image set pairs with the text tower
    of its own weights, not with the cliptext/<model> class features of the other."""
    path = tmp_path / "t.zarr"
    with create_store(path, _manifest(4)) as store:
        store.create_feature_set(FEAT, 1, (4,), _prov())
        store.create_feature_set("vit_random", 1, (4,), _prov("clip/ViT-B-32@none", {"kind": "random", "seed": 0}))
        store.create_feature_set("vit_seed5", 1, (4,), _prov("clip/ViT-B-32@none:5", {"kind": "random", "seed": 5}))
        store.write_class_features("cliptext/ViT-B-32", np.ones((10, 4), np.float32), _prov("cliptext/ViT-B-32@openai"))
        store.write_class_features("text_random", np.ones((10, 4), np.float32),
                                   _prov("cliptext/ViT-B-32@none", {"kind": "random", "seed": 0}))
        spec = lambda name: text_query.text_encoder_spec(store, store.feature_info(name))  # noqa: E731
        assert spec(FEAT) == "cliptext/ViT-B-32@openai"
        assert spec("vit_random") == "cliptext/ViT-B-32@none"  # the class features of the same weights
        assert spec("vit_seed5") == "cliptext/ViT-B-32@none:5"  # none stored: from its own provenance


@pytest.mark.slow
def test_a_text_query_finds_the_clip_holding_that_sentence_embedding(tmp_path, capsys):
    from featurestore.encoders import create_encoder

    text = "a quiet park at night"
    encoder = create_encoder("cliptext/ViT-S-32-alt@none:3")
    target = encoder.encode_text([text])[0].numpy()
    dim = target.shape[0]
    data = np.random.default_rng(0).standard_normal((N, SEG, dim)).astype(np.float16)
    data[17] = target.astype(np.float16)
    path = tmp_path / "text.zarr"
    with create_store(path, _manifest(N)) as store:
        store.create_feature_set("clip/ViT-S-32-alt", SEG, (dim,),
                                 _prov("clip/ViT-S-32-alt@none:3", {"kind": "random", "seed": 3}), chunk_clips=CHUNK)
        store.write_rows("clip/ViT-S-32-alt", 0, data)
    code = main(["search", str(path), "--feature-set", "clip/ViT-S-32-alt", "--text", text, "-k", "3", "--json"])
    out, err = capsys.readouterr()
    assert code == 0
    got = json.loads(out)
    assert got["results"][0]["clip_id"] == "c017" and got["results"][0]["score"] > 0.999
    assert got["query"] == {"text": text, "encoder": "cliptext/ViT-S-32-alt@none:3"}
    assert got["random_weights"] is True


# --------------------------------------------------------------------------------------------- CLI
def test_cli_search_table_json_and_exit_codes(store_path, capsys):
    path, _ = store_path
    assert main(["search", str(path), "--feature-set", FEAT, "--like", "c005", "-k", "4", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    with open_store(path) as store:
        expected = store.search(FEAT, "c005", k=4)
    assert [r["clip_id"] for r in got["results"]] == expected.clip_ids
    assert [r["rank"] for r in got["results"]] == [1, 2, 3, 4] and got["method"] == "exact"
    assert main(["search", str(path), "--feature-set", FEAT, "--like", "c005", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert expected.clip_ids[0] in out and "rank" in out and "exact search" in out
    assert main(["search", str(path), "--feature-set", FEAT]) == 2
    assert "give --like CLIP_ID (one or more) or --text TEXT" in capsys.readouterr().err
    assert main(["search", str(path), "--feature-set", "clip/nope", "--like", "c005"]) == 2
    assert "no feature set named 'clip/nope'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the faiss sidecar
def _faiss_sidecar(path: Path) -> Path:
    """The one ``.faiss`` file kept beside the store for FEAT (fails when there are none or several)."""
    files = list((Path(str(path) + search_mod.SIDECAR_SUFFIX) / "clip" / "ViT-B-32").glob("*.faiss"))
    assert len(files) == 1, f"expected one faiss sidecar for {FEAT}, found {[f.name for f in files]}"
    return files[0]


def _faiss_and_exact(path: Path, query: str = "c001"):
    with open_store(path) as store:  # a fresh store object: nothing memoised from earlier searches
        return store.search(FEAT, query, k=N, method="faiss"), store.search(FEAT, query, k=N, method="exact")


def _assert_same_answer(faiss: search_mod.SearchResult, exact: search_mod.SearchResult) -> None:
    assert faiss.method == "faiss" and exact.method == "exact"
    assert faiss.clip_ids == exact.clip_ids
    np.testing.assert_allclose(faiss.scores, exact.scores, atol=1e-5)


def test_the_faiss_sidecar_is_reused_while_the_set_is_unchanged_and_rebuilt_when_more_clips_are_done(tmp_path):
    pytest.importorskip("faiss", reason="faiss-cpu is not installed: there is no faiss sidecar to test")
    path = tmp_path / "grow.zarr"
    data = build(path, done=16)
    with open_store(path) as store:
        first = store.search(FEAT, "c001", k=N, method="faiss")
    assert any("built the faiss index" in n for n in first.notes), first.notes
    sidecar = _faiss_sidecar(path)
    stamp = (sidecar.stat().st_ino, sidecar.stat().st_mtime_ns)
    assert sorted(first.clip_ids) == sorted(f"c{i:03d}" for i in range(16) if i != 1)

    again, exact = _faiss_and_exact(path)  # unchanged: read from the sidecar, nothing built or rewritten
    assert not any("built the faiss index" in n for n in again.notes), again.notes
    assert _faiss_sidecar(path) == sidecar
    assert (sidecar.stat().st_ino, sidecar.stat().st_mtime_ns) == stamp, "the unchanged set's sidecar was rewritten"
    _assert_same_answer(again, exact)

    with open_store(path, mode="a") as store:
        store.write_rows(FEAT, 16, data[16:])  # 24 more clips done
    grown, exact = _faiss_and_exact(path)
    assert any("built the faiss index" in n and "(40 clips" in n for n in grown.notes), grown.notes
    rebuilt = _faiss_sidecar(path)  # the stale file is gone, the new one has another key
    assert rebuilt.name != sidecar.name and not sidecar.exists()
    assert len(grown.clip_ids) == N - 1 and "c030" in grown.clip_ids
    _assert_same_answer(grown, exact)
    rows, _ = brute_force(data, data[1].astype(np.float64).mean(0), np.array([r for r in range(N) if r != 1]))
    assert grown.clip_ids == [f"c{r:03d}" for r in rows]


def test_the_faiss_sidecar_is_rebuilt_when_done_rows_are_rewritten(tmp_path):
    """Same done mask, other values (rows written again): the old index would answer for old vectors."""
    pytest.importorskip("faiss", reason="faiss-cpu is not installed: there is no faiss sidecar to test")
    path = tmp_path / "rewrite.zarr"
    build(path)
    before, _ = _faiss_and_exact(path)
    old = _faiss_sidecar(path)
    new_data = np.random.default_rng(7).standard_normal((N, SEG, DIM)).astype(np.float16)
    with open_store(path, mode="a") as store:
        store.write_rows(FEAT, 0, new_data)
    after, exact = _faiss_and_exact(path)
    rows, _ = brute_force(new_data, new_data[1].astype(np.float64).mean(0), np.array([r for r in range(N) if r != 1]))
    expected = [f"c{r:03d}" for r in rows]
    assert expected != before.clip_ids  # the rewrite changes the answer
    assert after.clip_ids == expected, (
        f"rows rewritten under the same done mask, but the faiss sidecar {old.name} still answers for the old "
        f"vectors (rebuilt: {any('built the faiss index' in n for n in after.notes)})")
    _assert_same_answer(after, exact)
