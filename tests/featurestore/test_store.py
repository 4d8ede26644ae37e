"""The feature store's API on real Zarr v3 directories and HDF5 files (every test runs on both).

Integrity (corruption, verify, second processes, pickling) is in test_store_integrity.py; the
backends compared with each other and converted into each other in test_store_backends.py.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from featurestore import (
    TAU_CLASSES, ClipRecord, FingerprintMismatchError, Manifest, MissingFeatureError, ReadOnlyStoreError,
    UnknownClipError, UnknownFeatureError, UnknownValueError, create_store, open_store,
)

N_CLIPS, N_SEG, DIM, CHUNK = 20, 3, 4, 4
FEAT = "clip/ViT-B-32"


def make_manifest(n: int = N_CLIPS, first: int = 0, extra_split: str | None = None) -> Manifest:
    """Clips with labels cycling over the 10 classes, 3 cities, and two folds by location."""
    clips = []
    for i in range(first, first + n):
        city = ("london", "paris", "vienna")[i % 3]
        location = f"{city}-{i % 5}"
        splits = {"fold1_train" if i % 5 < 3 else "fold1_evaluate"}
        if extra_split:
            splits.add(extra_split)
        label = None if i == 7 else TAU_CLASSES[i % 10]
        clips.append(ClipRecord(f"{TAU_CLASSES[i % 10]}-{location}-{i}", audio=None, video=None, label=label,
                                city=city, location=location, splits=frozenset(splits)))
    return Manifest("toy", list(TAU_CLASSES), clips, audio_segments=N_SEG, video_frames=N_SEG)


def provenance(seed: int = 0, encoder: str = "clip/ViT-B-32@none", host: str = "a") -> dict:
    return {"encoder": encoder, "config": {"image_size": 224},
            "weights": {"kind": "random", "seed": seed}, "segments": {"frames": N_SEG},
            "runtime": {"host": host}}


def features(n: int = N_CLIPS, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, N_SEG, DIM)).astype(np.float16)


@pytest.fixture(params=["zarr", "hdf5"])
def path(request, tmp_path):
    return str(tmp_path / ("store.zarr" if request.param == "zarr" else "store.h5"))


@pytest.fixture
def filled(path):
    """A store with one feature set fully written except clip 19 (failed), and a prediction run."""
    data = features()
    with create_store(path, make_manifest()) as store:
        store.create_feature_set(FEAT, N_SEG, (DIM,), provenance(), chunk_clips=CHUNK)
        store.write_rows(FEAT, 0, data[:8])
        store.write_rows(FEAT, 8, data[8:])
        store.set_errors(FEAT, {19: "decode failed: truncated file"})
    return path, data


# ------------------------------------------------------------------------------------ round trip
def test_round_trip_index_features_errors(filled):
    path, data = filled
    manifest = make_manifest()
    with open_store(path, "r") as store:
        assert store.clip_ids == manifest.clip_ids
        assert store.classes == list(TAU_CLASSES)
        assert store.labels.dtype == np.int16
        assert store.labels[7] == -1 and store.labels[3] == 3
        assert list(store.column("city")[:3]) == ["london", "paris", "vienna"]
        assert store.splits() == ["fold1_evaluate", "fold1_train"]
        assert store.column("split/fold1_train").sum() == sum("fold1_train" in c.splits for c in manifest.clips)
        assert store.attrs["dataset"] == "toy"
        info = store.feature_sets()[FEAT]
        assert (info.shape, info.dtype, info.chunk_clips) == ((N_CLIPS, N_SEG, DIM), "float16", CHUNK)
        assert (info.n_done, info.n_errors) == (N_CLIPS - 1, 1)
        assert info.random_weights and info.weights_identity == "RANDOM(seed=0)"
        assert info.provenance["config"] == {"image_size": 224}
        assert store.errors(FEAT) == {manifest.clip_ids[19]: "decode failed: truncated file"}
        np.testing.assert_array_equal(store.get_many(FEAT, manifest.clip_ids[:19]), data[:19])
        np.testing.assert_array_equal(store.read_rows(FEAT, 4, 12), data[4:12])
        assert store.get(FEAT, manifest.clip_ids[5]).dtype == np.float16


def test_get_many_keeps_order_and_equals_get(filled):
    path, data = filled
    with open_store(path, "r") as store:
        ids = store.clip_ids
        order = [17, 2, 9, 2, 0, 13, 5]
        many = store.get_many(FEAT, [ids[i] for i in order])
        np.testing.assert_array_equal(many, data[order])
        for k, row in enumerate(order):
            np.testing.assert_array_equal(store.get(FEAT, ids[row]), many[k])
        assert store.get_many(FEAT, []).shape == (0, N_SEG, DIM)


def test_get_many_reads_each_chunk_once(filled, monkeypatch):
    path, data = filled
    with open_store(path, "r") as store:
        reads: list[tuple[str, int, int]] = []
        original = store._b.read

        def counting_read(array: str, start: int, stop: int):
            reads.append((array, start, stop))
            return original(array, start, stop)

        monkeypatch.setattr(store._b, "read", counting_read)
        ids = store.clip_ids
        rows = [0, 13, 1, 14, 2, 3, 12, 15, 6]  # chunks 0, 3, 0, 3, 0, 0, 3, 3, 1
        np.testing.assert_array_equal(store.get_many(FEAT, [ids[r] for r in rows]), data[rows])
        data_reads = [r for r in reads if r[0].endswith("/data")]
        assert sorted(data_reads) == [(f"features/{FEAT}/data", s, s + CHUNK) for s in (0, 4, 12)]
        reads.clear()
        store.get_many(FEAT, [ids[r] for r in rows])  # all three chunks are cached now
        assert not [r for r in reads if r[0].endswith("/data")]


# -------------------------------------------------------------------------- done and fingerprints
def test_not_done_clip_raises_never_zeros(path):
    with create_store(path, make_manifest()) as store:
        store.create_feature_set(FEAT, N_SEG, (DIM,), provenance(), chunk_clips=CHUNK)
        store.write_rows(FEAT, 0, features(4))
        ids = store.clip_ids
        with pytest.raises(MissingFeatureError, match=ids[4]):
            store.get(FEAT, ids[4])
        with pytest.raises(MissingFeatureError, match=ids[6]) as err:
            store.get_many(FEAT, [ids[0], ids[6], ids[7]])
        assert err.value.clip_ids == [ids[6], ids[7]]
        with pytest.raises(MissingFeatureError):
            store.read_rows(FEAT, 0, 5)
        assert store.read_rows(FEAT, 0, 5, check_done=False).shape == (5, N_SEG, DIM)
        assert store.done_mask(FEAT).tolist() == [True] * 4 + [False] * 16


def test_fingerprint_mismatch_names_both_configs_and_overwrite(path):
    with create_store(path, make_manifest()) as store:
        store.create_feature_set(FEAT, N_SEG, (DIM,), provenance(seed=0), chunk_clips=CHUNK)
        store.write_rows(FEAT, 0, features(4))
        with pytest.raises(FingerprintMismatchError) as err:
            store.create_feature_set(FEAT, N_SEG, (DIM,), provenance(seed=1), chunk_clips=CHUNK)
        text = str(err.value)
        assert "\n" not in text and "--overwrite" in text
        assert "(weights.seed: existing 0, requested 1)" in text  # only the seed, in one line
        assert err.value.existing["weights"]["seed"] == 0 and err.value.requested["weights"]["seed"] == 1
        info = store.create_feature_set(FEAT, N_SEG, (DIM,), provenance(seed=1), chunk_clips=CHUNK, overwrite=True)
        assert info.n_done == 0 and info.provenance["weights"]["seed"] == 1
        with pytest.raises(MissingFeatureError):
            store.get(FEAT, store.clip_ids[0])


def test_check_feature_set_says_what_create_would_do_and_writes_nothing(path):
    with create_store(path, make_manifest()) as store:
        assert store.check_feature_set(FEAT, N_SEG, (DIM,), provenance()) is False
        assert FEAT not in store.feature_sets()  # asking created nothing
        store.create_feature_set(FEAT, N_SEG, (DIM,), provenance(), chunk_clips=CHUNK)
        store.write_rows(FEAT, 0, features(4))
        assert store.check_feature_set(FEAT, N_SEG, (DIM,), provenance()) is True
        with pytest.raises(FingerprintMismatchError, match="weights.seed: existing 0, requested 1"):
            store.check_feature_set(FEAT, N_SEG, (DIM,), provenance(seed=1))
        with pytest.raises(FingerprintMismatchError, match="shape"):
            store.check_feature_set(FEAT, N_SEG + 1, (DIM,), provenance())
        assert store.check_feature_set(FEAT, N_SEG, (DIM,), provenance(seed=1), overwrite=True) is False
        np.testing.assert_array_equal(store.read_rows(FEAT, 0, 4), features(4))  # untouched


def test_same_fingerprint_resumes_with_data_intact(path):
    data = features()
    with create_store(path, make_manifest()) as store:
        first = store.create_feature_set(FEAT, N_SEG, (DIM,), provenance(host="a"), chunk_clips=CHUNK)
        store.write_rows(FEAT, 0, data[:8])
    with open_store(path, "a") as store:  # another run: the runtime section differs, the config does not
        again = store.create_feature_set(FEAT, N_SEG, (DIM,), provenance(host="b"), chunk_clips=CHUNK)
        assert again.fingerprint == first.fingerprint and again.n_done == 8
        assert again.provenance["runtime"]["host"] == "a"
        np.testing.assert_array_equal(store.read_rows(FEAT, 0, 8), data[:8])
        store.write_rows(FEAT, 8, data[8:])
        np.testing.assert_array_equal(store.get_many(FEAT, store.clip_ids), data)


def test_data_version_changes_when_done_rows_are_rewritten_not_when_new_rows_finish(path):
    """Caches built from a set's values (search) are keyed by done mask + data version: finishing
    new rows changes the mask, rewriting finished rows or recreating the set changes the version."""
    data = features()
    with create_store(path, make_manifest()) as store:
        store.create_feature_set(FEAT, N_SEG, (DIM,), provenance(), chunk_clips=CHUNK)
        created = store.data_version(FEAT)
        assert created
        store.write_rows(FEAT, 0, data[:8])  # rows not done before: same version
        assert store.data_version(FEAT) == created
        with open_store(path, "r") as reader:
            seen = reader.data_version(FEAT)
            assert seen == created
            store.write_rows(FEAT, 0, data[:8] + 1)  # finished rows written again
            rewritten = store.data_version(FEAT)
            assert rewritten != created
            assert reader.data_version(FEAT) == seen  # cached until refresh, like done masks
            assert reader.data_version(FEAT, refresh=True) == rewritten
        store.create_feature_set(FEAT, N_SEG, (DIM,), provenance(seed=1), chunk_clips=CHUNK, overwrite=True)
        final = store.data_version(FEAT)
        assert final not in (created, rewritten)
    with open_store(path, "r") as store:  # stored in the set's attributes, not only in memory
        assert store.data_version(FEAT) == final


def test_errors_clear_done_and_rewrite_clears_errors(filled):
    path, data = filled
    with open_store(path, "a") as store:
        ids = store.clip_ids
        store.set_errors(FEAT, {ids[2]: "x" * 40})  # longer than HDF5's initial string width
        assert store.errors(FEAT)[ids[2]] == "x" * 40
        with pytest.raises(MissingFeatureError):
            store.get(FEAT, ids[2])
        store.write_rows(FEAT, 0, data[:4])
        assert ids[2] not in store.errors(FEAT)
        np.testing.assert_array_equal(store.get(FEAT, ids[2]), data[2])
        store.clear_errors(FEAT, [19])
        assert store.errors(FEAT) == {}
        with pytest.raises(MissingFeatureError):  # no longer failed, still not computed
            store.get(FEAT, ids[19])


# ------------------------------------------------------------------------------ input validation
def test_unknown_clip_feature_split_list_names(filled):
    path, _ = filled
    with open_store(path, "r") as store:
        real = store.clip_ids[3]
        with pytest.raises(UnknownClipError, match=f"nearest ids: {real}"):
            store.get(FEAT, real + "x")
        with pytest.raises(UnknownClipError):
            store.get_many(FEAT, [store.clip_ids[0], "nope"])
        with pytest.raises(UnknownFeatureError, match="the store has: clip/ViT-B-32.*Did you mean clip/ViT-B-32"):
            store.get("clip/ViT-B-16", real)
        with pytest.raises(UnknownFeatureError, match="fold1_evaluate, fold1_train"):
            store.select(split="fold2_train")
        with pytest.raises(UnknownFeatureError, match="airport"):
            store.select(label="beach")
        with pytest.raises(UnknownFeatureError, match="prediction run"):
            store.get_predictions("nope")
        with pytest.raises(UnknownFeatureError, match="index column"):
            store.column("weather")


def test_select_with_an_unknown_value_raises_naming_column_value_and_known(filled):
    path, _ = filled
    with open_store(path, "r") as store:
        for kwargs, column, known in [({"city": "londn"}, "city", "london, paris, vienna"),
                                      ({"location": ["paris-1", "rome-1"]}, "location", "london-0"),
                                      ({"label": "beach"}, "label", "airport"),
                                      ({"label": 10}, "label", "index 0..9"),
                                      ({"label": -2}, "label", "index 0..9"),
                                      ({"split": "fold2_train"}, "split", "fold1_evaluate, fold1_train")]:
            with pytest.raises(UnknownValueError, match=known) as caught:
                store.select(**kwargs)
            err = caught.value
            assert err.column == column and isinstance(err, UnknownFeatureError) and isinstance(err, KeyError)
            assert repr(err.value) in str(err) and "\n" not in str(err)
        assert "Did you mean london?" in str(pytest.raises(UnknownValueError, store.select, city="londn").value)
        # known values still select as before; -1 selects the clips without a label
        assert len(store.select(city="paris")) == len([i for i in range(N_CLIPS) if i % 3 == 1])
        assert store.select(label=-1) == [store.clip_ids[7]]
        assert store.select(label=9) == store.select(label=TAU_CLASSES[9])


def test_set_classes_only_on_a_store_without_classes(path):
    unlabelled = Manifest("toy", [], [ClipRecord(f"c{i}") for i in range(4)], audio_segments=N_SEG)
    with create_store(path, unlabelled) as store:
        assert store.classes == []
        store.set_classes(["a", "b"])
        store.set_classes(["a", "b"])  # the same list again: nothing changes
        with pytest.raises(ValueError, match=r"already has classes \['a', 'b'\]"):
            store.set_classes(["b", "a"])
        more = Manifest("more", [], [ClipRecord("c9")], audio_segments=N_SEG)
        store.append_clips(more)  # unlabelled clips keep the store's classes
        assert store.classes == ["a", "b"] and store.n_clips == 5 and (store.labels == -1).all()
    with open_store(path, "r") as store:
        assert store.classes == ["a", "b"]
    other = path.replace("store", "other")
    with create_store(other, unlabelled) as store:
        with pytest.raises(ValueError, match="more than once"):
            store.set_classes(["a", "a"])
        for make in (lambda: store.create_predictions("zs", N_SEG, {"head": "zero_shot"}),
                     lambda: store.write_class_features("cliptext/x", np.zeros((0, 4), np.float32), provenance())):
            with pytest.raises(ValueError, match=r"has none \(made from a manifest without labels\).*--classes"):
                make()
        assert store.classes == [] and store.prediction_runs() == {} and store.class_feature_sets() == []


def test_write_blocks_must_be_chunk_aligned(path):
    with create_store(path, make_manifest()) as store:
        store.create_feature_set(FEAT, N_SEG, (DIM,), provenance(), chunk_clips=CHUNK)
        data = features()
        with pytest.raises(ValueError, match="not aligned"):
            store.write_rows(FEAT, 2, data[:4])
        with pytest.raises(ValueError, match="not aligned"):
            store.write_rows(FEAT, 0, data[:6])
        with pytest.raises(ValueError, match="expected"):
            store.write_rows(FEAT, 0, np.zeros((4, N_SEG, DIM + 1)))
        with pytest.raises(ValueError, match="outside"):
            store.write_rows(FEAT, 16, data[:8])
        store.write_rows(FEAT, 16, data[16:])  # the end may be the last row
        assert store.done_mask(FEAT).sum() == 4
        with pytest.raises(ValueError, match="invalid feature set name"):
            store.create_feature_set("../evil", N_SEG, (DIM,), provenance())


def test_read_only_refuses_every_write(filled):
    path, data = filled
    with open_store(path, "r") as store:
        calls = [
            lambda: store.write_rows(FEAT, 0, data[:4]),
            lambda: store.create_feature_set("other", N_SEG, (DIM,), provenance()),
            lambda: store.set_errors(FEAT, {0: "x"}),
            lambda: store.append_clips(make_manifest(2, first=100)),
            lambda: store.write_class_features("cliptext/x", np.zeros((10, 2)), provenance()),
            lambda: store.create_predictions("run", N_SEG, {"head": "h"}),
            lambda: store.delete_feature_set(FEAT),
        ]
        for call in calls:
            with pytest.raises(ReadOnlyStoreError, match="read-only"):
                call()
        np.testing.assert_array_equal(store.get(FEAT, store.clip_ids[0]), data[0])


# ------------------------------------------------------------------------------- index and select
def test_append_clips_grows_every_array(filled):
    path, data = filled
    with open_store(path, "a") as store:
        store.create_predictions("run1", N_SEG, {"head": "mlp"}, chunk_clips=CHUNK)
        assert store.rows(store.clip_ids[:2]).tolist() == [0, 1]  # the index is loaded before the append
        new = make_manifest(6, first=100, extra_split="fold2_train")
        store.append_clips(new)
        assert store.rows(new.clip_ids).tolist() == list(range(N_CLIPS, N_CLIPS + 6))
        assert store.n_clips == N_CLIPS + 6
        assert store.feature_sets()[FEAT].shape == (N_CLIPS + 6, N_SEG, DIM)
        assert store.done_mask(FEAT)[N_CLIPS:].sum() == 0
        assert store.prediction_done("run1").shape == (N_CLIPS + 6,)
        assert store.column("split/fold2_train").tolist() == [False] * N_CLIPS + [True] * 6
        np.testing.assert_array_equal(store.read_rows(FEAT, 0, 19), data[:19])
        with pytest.raises(MissingFeatureError):
            store.get(FEAT, store.clip_ids[-1])
        store.write_rows(FEAT, 20, features(6, seed=5))
        np.testing.assert_array_equal(store.get(FEAT, store.clip_ids[-1]), features(6, seed=5)[-1])
        with pytest.raises(ValueError, match="unique"):
            store.append_clips(make_manifest(2, first=100))
    with open_store(path, "r") as store:
        assert store.n_clips == N_CLIPS + 6 and store.verify().ok


def test_select_by_split_label_city_lists(filled):
    path, _ = filled
    manifest = make_manifest()
    with open_store(path, "r") as store:
        def expect(pred):
            return [c.clip_id for c in manifest.clips if pred(c)]

        assert store.select(split="fold1_train") == expect(lambda c: "fold1_train" in c.splits)
        assert store.select(split=["fold1_train", "fold1_evaluate"]) == manifest.clip_ids
        assert store.select(label="bus") == expect(lambda c: c.label == "bus")
        assert store.select(label=["bus", 4]) == expect(lambda c: c.label in ("bus", "park"))
        assert store.select(city=["paris", "vienna"], split="fold1_evaluate") == expect(
            lambda c: c.city in ("paris", "vienna") and "fold1_evaluate" in c.splits)
        assert store.select(location="london-0") == expect(lambda c: c.location == "london-0")
        assert store.select(label=-1) == [manifest.clip_ids[7]]
        np.testing.assert_array_equal(store.rows(manifest.clip_ids[::-1]), np.arange(N_CLIPS)[::-1])


# ------------------------------------------------------------------- class features, predictions
def test_class_features_round_trip(filled):
    path, _ = filled
    text = np.random.default_rng(1).standard_normal((10, 6)).astype(np.float32)
    with open_store(path, "a") as store:
        store.write_class_features("cliptext/ViT-B-32", text, provenance(encoder="cliptext/ViT-B-32@none"),
                                   prompts=["a photo of a {}."])
        with pytest.raises(ValueError, match="10 classes"):
            store.write_class_features("cliptext/bad", text[:3], provenance())
    with open_store(path, "r") as store:
        assert store.class_feature_sets() == ["cliptext/ViT-B-32"]
        data, attrs = store.get_class_features("cliptext/ViT-B-32")
        np.testing.assert_array_equal(data, text)
        assert attrs["prompts"] == ["a photo of a {}."] and attrs["classes"] == list(TAU_CLASSES)
        assert attrs["provenance"]["encoder"] == "cliptext/ViT-B-32@none"
        with pytest.raises(UnknownFeatureError, match="cliptext/ViT-B-32"):
            store.get_class_features("cliptext/RN50")


def test_class_features_follow_the_fingerprint_rule(filled):
    """Same configuration: stored already; another one: refused naming both, until overwrite."""
    path, _ = filled
    first, second = provenance(encoder="cliptext/RN50@none"), provenance(encoder="cliptext/RN50@openai")
    with open_store(path, "a") as store:
        assert not store.has_class_features("cliptext/RN50", first)
        store.write_class_features("cliptext/RN50", np.ones((10, 3), np.float32), first)
        assert store.has_class_features("cliptext/RN50", first)
        with pytest.raises(FingerprintMismatchError, match="class feature set 'cliptext/RN50'.*encoder.*openai"):
            store.has_class_features("cliptext/RN50", second)
        with pytest.raises(FingerprintMismatchError, match="openai"):
            store.write_class_features("cliptext/RN50", np.zeros((10, 3), np.float32), second)
        np.testing.assert_array_equal(store.get_class_features("cliptext/RN50")[0], 1)  # nothing lost
        assert not store.has_class_features("cliptext/RN50", second, overwrite=True)
        store.write_class_features("cliptext/RN50", np.zeros((10, 3), np.float32), second, overwrite=True)
        data, attrs = store.get_class_features("cliptext/RN50")
    np.testing.assert_array_equal(data, 0)
    assert attrs["provenance"]["encoder"] == "cliptext/RN50@openai"


def test_predictions_round_trip(filled):
    path, _ = filled
    probs = np.random.default_rng(2).dirichlet(np.ones(10), size=(5, N_SEG)).astype(np.float32)
    rows = [9, 1, 2, 3, 15]
    with open_store(path, "a") as store:
        store.create_predictions("c04/seed0", N_SEG, {"head": "late_fusion", "features": {FEAT: "fp"}})
        store.write_predictions("c04/seed0", rows, probs)
        with pytest.raises(FileExistsError, match="overwrite"):
            store.create_predictions("c04/seed0", N_SEG, {"head": "late_fusion"})
        with pytest.raises(ValueError, match="expected"):
            store.write_predictions("c04/seed0", [0], np.zeros((1, N_SEG, 3)))
    with open_store(path, "r") as store:
        ids = store.clip_ids
        runs = store.prediction_runs()
        assert list(runs) == ["c04/seed0"] and runs["c04/seed0"]["features"] == {FEAT: "fp"}
        assert np.flatnonzero(store.prediction_done("c04/seed0")).tolist() == sorted(rows)
        np.testing.assert_array_equal(store.get_predictions("c04/seed0", [ids[r] for r in rows]), probs)
        with pytest.raises(MissingFeatureError, match=ids[0]):
            store.get_predictions("c04/seed0")  # every clip: most were never predicted


def test_chunk_with_a_failed_clip_is_still_cached(filled, monkeypatch):
    """Clip 19 failed; the other clips of its chunk (16-18) must not be re-read on every get."""
    path, data = filled
    with open_store(path, "r") as store:
        reads: list[tuple[str, int]] = []
        original = store._b.read
        monkeypatch.setattr(store._b, "read", lambda a, s, e: (reads.append((a, s)), original(a, s, e))[1])
        ids = store.clip_ids
        for _ in range(3):
            np.testing.assert_array_equal(store.get(FEAT, ids[17]), data[17])
            np.testing.assert_array_equal(store.get_many(FEAT, [ids[16], ids[18]]), data[[16, 18]])
        assert [r for r in reads if r[0].endswith("/data")] == [(f"features/{FEAT}/data", 16)]


def test_rows_finished_by_another_writer_are_not_served_stale(tmp_path):
    """A reader that cached a partly done chunk sees the rows another store object finished later.

    Zarr only: an HDF5 file takes one writer and no concurrent readers (file locking).
    """
    path = str(tmp_path / "store.zarr")
    data = features()
    with create_store(path, make_manifest()) as store:
        store.create_feature_set(FEAT, N_SEG, (DIM,), provenance(), chunk_clips=CHUNK)
        store.write_rows(FEAT, 0, np.zeros((4, N_SEG, DIM), np.float16))
        store.set_errors(FEAT, {1: "failed once"})
    with open_store(path, "r") as reader, open_store(path, "a") as writer:
        ids = reader.clip_ids
        np.testing.assert_array_equal(reader.get(FEAT, ids[0]), 0)  # chunk 0 read while row 1 failed
        writer.write_rows(FEAT, 0, data[:4])  # a retry by another process rewrites the chunk
        np.testing.assert_array_equal(reader.get(FEAT, ids[1]), data[1])
        reader.refresh()  # rows done before the retry are served from the cache until a refresh
        np.testing.assert_array_equal(reader.get(FEAT, ids[0]), data[0])


def test_same_fingerprint_with_another_segment_count_is_refused(path):
    """The segment count is outside the fingerprint (dev vs eval sets), so the shape must guard it."""
    with create_store(path, make_manifest()) as store:
        store.create_feature_set(FEAT, N_SEG, (DIM,), provenance(), chunk_clips=CHUNK)
        with pytest.raises(FingerprintMismatchError, match="shape"):
            store.create_feature_set(FEAT, N_SEG + 1, (DIM,), provenance(), chunk_clips=CHUNK)
        assert store.feature_info(FEAT).shape[1] == N_SEG


def test_prediction_run_attrs_are_read_once_and_follow_own_writes(filled, monkeypatch):
    path, _ = filled
    with open_store(path, "a") as store:
        store.create_predictions("a", N_SEG, {"head": "x"})
        assert set(store.prediction_runs()) == {"a"}
        reads = []
        original = store._b.get_attrs
        monkeypatch.setattr(store._b, "get_attrs", lambda p: reads.append(p) or original(p))
        store.prediction_runs()["a"]["head"] = "edited"  # a copy: the cache is not changed
        assert store.prediction_runs()["a"]["head"] == "x" and reads == []
        store.create_predictions("b", N_SEG, {"head": "y"})
        assert set(store.prediction_runs()) == {"a", "b"}
        store.delete_predictions("a")
        assert set(store.prediction_runs()) == {"b"}


def test_a_creation_interrupted_before_its_attributes_is_replaced_not_refused(path):
    with create_store(path, make_manifest()) as store:
        store.create_feature_set(FEAT, N_SEG, (DIM,), provenance(seed=1), chunk_clips=CHUNK)
        attrs = store._b._node(f"features/{FEAT}").attrs
        for key in list(attrs):  # what a kill between the arrays and the attributes leaves
            del attrs[key]
    with open_store(path, "a") as store:
        info = store.create_feature_set(FEAT, N_SEG, (DIM,), provenance(seed=2), chunk_clips=CHUNK)
        assert info.fingerprint and info.n_done == 0
        with pytest.raises(FingerprintMismatchError):  # a finished creation is still protected
            store.create_feature_set(FEAT, N_SEG, (DIM,), provenance(seed=3), chunk_clips=CHUNK)


def test_a_store_opened_by_a_relative_path_still_reads_after_a_chdir(path, tmp_path, monkeypatch):
    with create_store(path, make_manifest()) as store:
        store.create_feature_set(FEAT, N_SEG, (DIM,), provenance(), chunk_clips=CHUNK)
        store.write_rows(FEAT, 0, features(4))
    monkeypatch.chdir(os.path.dirname(path))
    with open_store(os.path.basename(path)) as store:
        monkeypatch.chdir(tmp_path.parent)  # e.g. a notebook that changes directory
        np.testing.assert_array_equal(store.read_rows(FEAT, 0, 4), features(4))
        assert store.location == str(path)


def test_prediction_runs_of_an_open_store_list_a_run_written_by_another_handle(filled):
    """heads.predict opens the store itself: a reader's open handle must list the new run, as
    get_predictions already sees it, without a refresh()."""
    path, _ = filled
    if path.endswith(".h5"):
        pytest.skip("HDF5 opens no writer while a reader holds the file (docs/store.md)")
    with open_store(path) as reader:
        before = set(reader.prediction_runs())
        with open_store(path, "a") as writer:
            writer.create_predictions("late", N_SEG, {"head": "z"})
            writer.write_predictions("late", np.arange(2), np.full((2, N_SEG, 10), 0.1, dtype=np.float32))
        assert set(reader.prediction_runs()) == before | {"late"}
        assert reader.prediction_runs()["late"]["head"] == "z"
        with open_store(path, "a") as writer:
            writer.delete_predictions("late")
        assert set(reader.prediction_runs()) == before
