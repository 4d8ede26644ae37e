"""Hostile inputs to the loaders that read the store, zero-shot heads and their class prompts, and predict."""
from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

import heads
from featurestore.store import open_store
from heads.cli import main
from heads.config import ConfigError, TrainConfig

from tests.heads._store import provenance

zero_shot = importlib.import_module("heads.zero_shot")


def _zero_shot(store, out: Path, feature: str, class_features: str, checked: bool = False) -> Path:
    """A zero-shot run; ``checked=False`` makes it as code before `check_towers` did (training checks
    the towers now), so that what predict and classify do with such a run is tested."""
    cfg = TrainConfig(head="zero_shot", features=[feature], train_split="train", val_split="val",
                      head_config={"class_features": class_features}, out=str(out), progress=False)
    with pytest.MonkeyPatch.context() as patch:
        if not checked:
            patch.setattr(zero_shot, "check_towers", lambda info, run_dir: None)
        heads.train(cfg, store)
    return out


def test_training_a_zero_shot_run_on_prompts_of_another_model_is_refused(tmp_path, writable_store):
    with pytest.raises(ConfigError, match=r"different CLIP models \(RN101 and ViT-B-32\)"):
        _zero_shot(writable_store, tmp_path / "zs", "clip/RN101", "cliptext/ViT-B-32", checked=True)
    assert not (tmp_path / "zs" / "best.safetensors").exists()


def test_classifying_files_with_a_zero_shot_run_of_mismatched_towers_is_refused(tmp_path, writable_store):
    from heads.trained import TrainedHead

    run = _zero_shot(writable_store, tmp_path / "zs", "clip/RN101", "cliptext/ViT-B-32")
    with pytest.raises(ConfigError, match="different CLIP models"):
        TrainedHead.load(run, "cpu")


# ------------------------------------------------------------------------- zero-shot: matching towers
def test_zero_shot_prompts_of_another_clip_model_are_refused_before_anything_is_written(tmp_path, writable_store,
                                                                                         capsys):
    """RN101 frame embeddings against ViT-B-32 prompt embeddings (both 16 wide here, both 512 in CLIP)
    are cosines between two unrelated spaces: before, predict wrote them into the store as probabilities."""
    run = _zero_shot(writable_store, tmp_path / "zs", "clip/RN101", "cliptext/ViT-B-32")
    with pytest.raises(ConfigError, match=r"clip/RN101.*cliptext/ViT-B-32.*different CLIP models \(RN101 and "
                                          r"ViT-B-32\)"):
        heads.predict(writable_store, run, progress=False)
    assert "zs" not in writable_store.prediction_runs()
    location = writable_store.location
    writable_store.close()
    capsys.readouterr()
    assert main(["predict", "--store", location, "--run", str(run), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "different CLIP models" in err and "head_config class_features" in err
    with open_store(location) as store:
        assert "zs" not in store.prediction_runs()


def test_zero_shot_prompts_of_other_weights_of_the_same_model_are_refused(tmp_path, writable_store):
    """The text tower of random weights against image embeddings of the OpenAI weights."""
    means = writable_store.get_class_features("cliptext/RN101")[0]
    writable_store.write_class_features("text_random", means, provenance("cliptext/RN101@none", "text", kind="random"))
    run = _zero_shot(writable_store, tmp_path / "zs", "clip/RN101", "text_random")
    with pytest.raises(ConfigError, match=r"different weights \(openai and RANDOM\(seed=0\)\)"):
        heads.predict(writable_store, run, progress=False)
    assert "zs" not in writable_store.prediction_runs()


@pytest.mark.parametrize("text", ["cliptext/RN101", "text_tuned"])
def test_zero_shot_prompts_of_the_same_tower_still_predict(tmp_path, writable_store, text):
    """The same model and weights, or a text tower from a checkpoint file (tuned to the frozen image tower)."""
    if text == "text_tuned":
        means = writable_store.get_class_features("cliptext/RN101")[0]
        weights = {"kind": "file", "path": "/ckpt/text.pt", "sha256": "cd" * 32}
        writable_store.write_class_features(text, means, {"encoder": "cliptext/RN101@/ckpt/text.pt",
                                                          "config": {"modality": "text"}, "weights": weights})
    run = _zero_shot(writable_store, tmp_path / "zs", "clip/RN101", text)
    result = heads.predict(writable_store, run, progress=False)
    probs = writable_store.get_predictions("zs")
    assert result.n_clips == writable_store.n_clips
    assert (probs.mean(1).argmax(1) == np.asarray(writable_store.labels)).mean() > 0.9


# ------------------------------------------------------------------- class features: a killed write
WRITE_B = """
import numpy as np
from featurestore.store import open_store
with open_store({path!r}, mode="a") as store:
    store.write_class_features("cliptext/M", np.full((4, 8), 2.0, np.float32), {prov!r}, overwrite=True)
"""
TOWER_A = {"encoder": "cliptext/M@a", "config": {"modality": "text"}, "weights": {"kind": "pretrained", "tag": "a"}}
TOWER_B = {"encoder": "cliptext/M@b", "config": {"modality": "text"}, "weights": {"kind": "pretrained", "tag": "b"}}


def _class_store(path: Path) -> Path:
    from featurestore import ClipRecord, Manifest
    from featurestore.store import create_store

    classes = ["airport", "bus", "park", "tram"]
    clips = [ClipRecord(f"c{i}", label=classes[i % 4], splits=frozenset({"train"})) for i in range(8)]
    with create_store(path, Manifest("t", classes, clips)) as store:
        store.write_class_features("cliptext/M", np.full((4, 8), 1.0, np.float32), TOWER_A)
    return path


@pytest.mark.parametrize("target, nth", [("set_attrs", 1), ("set_attrs", 2), ("write", 1)])
def test_a_killed_overwrite_of_class_features_never_leaves_values_under_the_old_fingerprint(tmp_path, target, nth):
    """Overwriting tower A's prompt embeddings with tower B's, SIGKILLed at each metadata or data write:
    before, a kill after the values (or right after the array was made: zeros) left them under A's
    fingerprint, so the next extraction of A said "unchanged" and a zero-shot head used them (or, for
    the zeros, every read failed while extraction kept saying "unchanged")."""
    from featurestore.errors import FingerprintMismatchError, UnknownFeatureError
    from tests.featurestore.test_store_faults import KILL_ON_NTH, run_killed

    path = _class_store(tmp_path / "s.zarr")
    run_killed(KILL_ON_NTH.format(target=target, nth=nth), WRITE_B.format(path=str(path), prov=TOWER_B))
    with open_store(path, mode="a") as store:
        if "cliptext/M" in store.class_feature_sets():
            data, attrs = store.get_class_features("cliptext/M")
            value = {"cliptext/M@a": 1.0, "cliptext/M@b": 2.0}[attrs["provenance"]["encoder"]]
            assert np.all(data == value), (attrs["provenance"]["encoder"], data)
        else:
            with pytest.raises(UnknownFeatureError, match="'cliptext/M' is unfinished: its writer stopped"):
                store.get_class_features("cliptext/M")
            said = [p.what for p in store.verify().problems if p.where == "class_features/cliptext/M"]
            assert any("is unfinished: its writer stopped" in m for m in said), said
        try:  # what extraction asks before skipping the write
            same_as_a = store.has_class_features("cliptext/M", TOWER_A)
        except FingerprintMismatchError:  # B's, finished
            same_as_a = False
        if same_as_a:
            assert np.all(store.get_class_features("cliptext/M")[0] == 1.0)
        # a rerun of the write finishes, with or without overwrite (an unfinished set is not there)
        store.write_class_features("cliptext/M", np.full((4, 8), 2.0, np.float32), TOWER_B,
                                   overwrite="cliptext/M" in store.class_feature_sets())
        data, attrs = store.get_class_features("cliptext/M")
        assert np.all(data == 2.0) and attrs["provenance"]["encoder"] == "cliptext/M@b"
        assert store.class_feature_sets() == ["cliptext/M"]


# ---------------------------------------------------- zero-shot: a store with the classes in another order
def _prompted(encoder: str, classes: list[str]) -> dict:
    """Class-feature provenance as extraction records it: the tower's, plus one prompt per class in the
    store's class order (``featurestore.extract.plan.text_provenance``)."""
    return {**provenance(encoder, "text"), "prompts": [f"a photo of a {name}." for name in classes]}


def _store_with_prompts(path: Path, src, classes: list[str]):
    """``src``'s clips (labels kept by name) and clip/ViT-B-32 features in a store whose class list is
    ``classes``, with cliptext/ViT-B-32 prompt embeddings written in that order."""
    from featurestore import ClipRecord, Manifest
    from featurestore.store import create_store

    ids, labels = src.clip_ids, [src.classes[i] for i in src.labels]
    splits = {s: np.asarray(src.column(f"split/{s}"), dtype=bool) for s in src.splits()}
    clips = [ClipRecord(clip_id=c, label=lab, splits=frozenset(s for s, m in splits.items() if m[i]))
             for i, (c, lab) in enumerate(zip(ids, labels))]
    dst = create_store(path, Manifest("tiny", list(classes), clips))
    info = src.feature_info("clip/ViT-B-32")
    dst.create_feature_set("clip/ViT-B-32", info.n_segments, info.feature_shape, info.provenance, chunk_clips=16)
    dst.write_rows("clip/ViT-B-32", 0, src.get_many("clip/ViT-B-32", ids))
    means = src.get_class_features("cliptext/ViT-B-32")[0]
    order = [src.classes.index(name) for name in classes]
    dst.write_class_features("cliptext/ViT-B-32", means[order], _prompted("cliptext/ViT-B-32@openai", classes),
                             prompts=[f"a photo of a {name}." for name in classes])
    return dst


def test_zero_shot_predicts_on_a_store_with_its_classes_and_prompts_in_another_order(tmp_path, tiny_store):
    """Before, the reordered store's own prompt embeddings (same tower, prompts listed in its class
    order) were refused as 'computed with another encoder configuration or weights', although
    predict maps the head's columns to the store's classes by name."""
    classes = list(tiny_store.classes)
    same = _store_with_prompts(tmp_path / "same.zarr", tiny_store, classes)
    swapped = _store_with_prompts(tmp_path / "swapped.zarr", tiny_store, classes[::-1])
    run = _zero_shot(same, tmp_path / "zs", "clip/ViT-B-32", "cliptext/ViT-B-32")
    heads.predict(same, run, progress=False)
    heads.predict(swapped, run, progress=False)
    ref, got = same.get_predictions("zs"), swapped.get_predictions("zs")
    np.testing.assert_allclose(got, ref[..., ::-1], atol=1e-6)
    assert (got.mean(1).argmax(1) == np.asarray(swapped.labels)).mean() > 0.9
    same.close()
    swapped.close()


# ------------------------------------------------------------------------ loaders: argument checks
@pytest.mark.parametrize("kwargs, named", [
    ({"block_clips": 0}, "block_clips"),  # before: read as the default (the chunk size), silently
    ({"block_clips": -4}, "block_clips"),  # before: one-row blocks, each its own read group
    ({"batch_size": 2.5}, "batch_size"),  # before: a TypeError about slice indices at the first batch
    ({"batch_size": "8"}, "batch_size"),  # before: a TypeError comparing str and int
    ({"shuffle_buffer": 0}, "shuffle_buffer"),
    ({"seed": -1}, "seed"),  # before: numpy's error at the first iteration, naming nothing
])
def test_a_store_dataset_size_that_is_no_whole_number_in_range_is_refused_naming_it(tiny_store, kwargs, named):
    from featurestore.torchdata import StoreDataset

    with pytest.raises(ValueError, match=rf"^StoreDataset: {named} must be an integer >= [01].*got "):
        StoreDataset(tiny_store, "clip/RN101", split="train", **{"batch_size": 8, **kwargs})


def test_a_store_dataset_of_clip_ids_given_twice_is_refused_naming_them(tiny_store):
    """Before: the repeat was dropped without a word (a caller weighting a clip by listing it twice
    trained on it once)."""
    from featurestore.torchdata import StoreDataset

    ids = tiny_store.clip_ids
    with pytest.raises(ValueError, match=rf"clip_ids: \['{ids[2]}'\] given more than once"):
        StoreDataset(tiny_store, "clip/RN101", clip_ids=[ids[2], ids[0], ids[2]], batch_size=2)
    assert len(StoreDataset(tiny_store, "clip/RN101", clip_ids=[ids[2], ids[0]], batch_size=2,
                            level="clip").rows) == 2


def test_tensor_batches_refuse_rows_that_are_not_one_per_sample():
    """Before: rows shorter than the samples failed mid-epoch with an IndexError; longer ones were
    silently taken as the first N."""
    import torch

    from featurestore.torchdata import TensorBatches

    x, labels = torch.zeros(10, 3), torch.zeros(10, dtype=torch.long)
    for rows in (torch.arange(7), torch.arange(12)):
        with pytest.raises(ValueError, match=r"rows has shape \(\d+,\), expected \(10,\)"):
            TensorBatches([x], labels, 4, rows=rows)
    with pytest.raises(ValueError, match=r"segments has shape"):
        TensorBatches([x], labels, 4, segments=torch.zeros(10, 2))
    assert [len(b) for b in TensorBatches([x], labels, 4, rows=torch.arange(10))] == [4, 4, 2]


# ---------------------------------------------------------------- zero-shot: prompt embeddings that say nothing
@pytest.mark.parametrize("damage, message", [
    ("same", r"rows 1 and 3 \(classes in the store's order\) are identical, so zero-shot cannot tell"),
    ("zero", r"row\(s\) 2 \(classes in the store's order\) are all zeros"),
])
def test_zero_shot_refuses_prompt_embeddings_it_cannot_tell_classes_apart_with(tmp_path, writable_store, damage,
                                                                                message):
    """Class names whose prompts are one text (``Bus``/``bus`` or ``metro_station``/``metro station``:
    CLIP lowercases and '_' becomes a space) give identical rows: before, zero-shot trained and
    predicted, splitting every probability between the two classes and always naming the first; an
    all-zero row gave its class logit 0 whatever the image. (NaN rows: the store refuses them, below.)"""
    means = writable_store.get_class_features("cliptext/ViT-B-32")[0].copy()
    if damage == "same":
        means[3] = means[1]
    else:
        means[2] = 0
    writable_store.write_class_features("text_bad", means, provenance("cliptext/ViT-B-32@openai", "text"))
    with pytest.raises(ValueError, match=rf"class features 'text_bad': {message}"):
        _zero_shot(writable_store, tmp_path / "zs", "clip/ViT-B-32", "text_bad")


def test_class_features_holding_nan_are_refused_by_the_store_and_nothing_is_written(tmp_path):
    """Before, the store kept them silently (verify does not look at their values); the earlier set stays."""
    path = _class_store(tmp_path / "s.zarr")
    bad = np.full((4, 8), 3.0, np.float32)
    bad[2, 1] = np.inf
    with open_store(path, mode="a") as store:
        with pytest.raises(ValueError, match=r"class features 'cliptext/M': 1 class\(es\) hold NaN or infinity "
                                             r"\(park\); nothing was written"):
            store.write_class_features("cliptext/M", bad, TOWER_B, overwrite=True)
        with pytest.raises(ValueError, match="hold NaN or infinity"):
            store.write_class_features("other", np.full((4, 8), np.nan, np.float16), TOWER_B)
        data, attrs = store.get_class_features("cliptext/M")
        assert np.all(data == 1.0) and attrs["provenance"]["encoder"] == "cliptext/M@a"
        assert store.class_feature_sets() == ["cliptext/M"]


# ------------------------------------------------------------------ text queries: the matching tower
@pytest.mark.parametrize("image_weights, image_spec, expected", [
    ({"kind": "pretrained", "tag": "laion2b_s34b_b79k"}, "clip/ViT-B-32@laion2b_s34b_b79k",
     "cliptext/ViT-B-32@laion2b_s34b_b79k"),
    ({"kind": "random", "seed": 0}, "clip/ViT-B-32@none", "cliptext/ViT-B-32@none"),
])
def test_a_text_query_uses_the_text_tower_of_the_image_sets_own_weights(tmp_path, image_weights, image_spec,
                                                                        expected):
    """The store's cliptext/ViT-B-32 prompts came from the OpenAI weights, its clip/ViT-B-32 frames from
    other ones: before, a sentence was embedded by the OpenAI text tower and ranked the other
    weights' frame embeddings by noise, flagged nowhere (for LAION weights nothing is random)."""
    from featurestore import ClipRecord, Manifest
    from featurestore.store import create_store
    from featurestore.text_query import text_encoder_spec

    clips = [ClipRecord(f"c{i}", label="ab"[i % 2]) for i in range(4)]
    with create_store(tmp_path / "s.zarr", Manifest("t", ["a", "b"], clips)) as store:
        store.create_feature_set("clip/ViT-B-32", 1, (8,), {"encoder": image_spec, "config": {},
                                                           "weights": image_weights})
        store.write_class_features("cliptext/ViT-B-32", np.ones((2, 8), np.float32),
                                   provenance("cliptext/ViT-B-32@openai", "text"))
        assert text_encoder_spec(store, store.feature_info("clip/ViT-B-32")) == expected
