"""Prediction into the store: shape, attrs fusion reads, splits, random-weights flag, fingerprint refusal."""
from __future__ import annotations

import numpy as np
import pytest

import heads
from heads.config import TrainConfig

from tests.heads._store import CLASSES, N_CLIPS, SEGMENTS, provenance

CLIP3 = ["clip/RN50x4", "clip/RN101", "clip/ViT-B-32"]
REQUIRED = {"head", "head_config", "features", "train_split", "val_split", "family", "random_weights",
            "weights_identity"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_store_path):
    """One late-fusion run and one zero-shot run on the shared tiny store."""
    from featurestore.store import open_store

    out = tmp_path_factory.mktemp("runs")
    store = open_store(tiny_store_path)
    lf = TrainConfig(head="late_fusion", features=CLIP3, train_split="train", val_split="val",
                     out=str(out / "c04"), epochs=2, batch_size=16, progress=False)
    zs = TrainConfig(head="zero_shot", features=["clip/ViT-B-32"], train_split="train", val_split="val",
                     head_config={"class_features": "cliptext/ViT-B-32"}, out=str(out / "c03"), progress=False)
    heads.train(lf, store)
    heads.train(zs, store)
    store.close()
    return out


def test_predictions_cover_every_clip_and_segment(writable_store, trained):
    result = heads.predict(writable_store, trained / "c04", progress=False)
    assert result.run == "c04" and result.n_clips == N_CLIPS and result.n_skipped == 0
    probs = writable_store.get_predictions("c04")
    assert probs.shape == (N_CLIPS, SEGMENTS, len(CLASSES))
    assert np.allclose(probs.sum(-1), 1.0, atol=1e-5)
    labels = np.asarray(writable_store.labels)
    assert (probs.mean(1).argmax(1) == labels).mean() > 0.9


def test_prediction_attrs_say_what_produced_them(writable_store, trained):
    heads.predict(writable_store, trained / "c04", name="lf", progress=False)
    attrs = writable_store.prediction_runs()["lf"]
    assert REQUIRED <= set(attrs)
    sets = writable_store.feature_sets()
    assert attrs["features"] == {n: sets[n].fingerprint for n in CLIP3}
    assert attrs["family"] == "clip" and attrs["random_weights"] is False
    assert attrs["weights_identity"] == {n: "openai" for n in CLIP3}
    assert attrs["train_split"] == "train" and attrs["val_split"] == "val"
    assert attrs["head"] == "late_fusion" and attrs["head_config"]["input_dims"] == [24, 16, 16]


def test_zero_shot_predicts_from_the_stored_class_prompts(writable_store, trained):
    heads.predict(writable_store, trained / "c03", split="val", family="clip-zs", progress=False)
    attrs = writable_store.prediction_runs()["c03"]
    assert attrs["family"] == "clip-zs" and attrs["class_features"]
    assert "cliptext/ViT-B-32" in attrs["weights_identity"]
    done = writable_store.prediction_done("c03")
    val_rows = writable_store.rows(writable_store.select(split="val"))
    assert done.sum() == len(val_rows) and done[val_rows].all()


def test_a_changed_feature_set_is_refused_naming_both_fingerprints(writable_store, trained):
    old = writable_store.feature_sets()["clip/RN101"].fingerprint
    writable_store.create_feature_set("clip/RN101", SEGMENTS, (16,), provenance("clip/RN101@other", "video"),
                                      chunk_clips=16, overwrite=True)
    writable_store.write_rows("clip/RN101", 0, np.zeros((N_CLIPS, SEGMENTS, 16), dtype=np.float16))
    new = writable_store.feature_sets()["clip/RN101"].fingerprint
    with pytest.raises(heads.FeatureFingerprintError) as err:
        heads.predict(writable_store, trained / "c04", progress=False)
    assert old in str(err.value) and new in str(err.value) and "clip/RN101" in str(err.value)


def test_random_weights_are_flagged(writable_store, tmp_path):
    rng = np.random.default_rng(0)
    writable_store.create_feature_set("timm/rand", SEGMENTS, (6,), provenance("timm/rand@none", "video", seed=4,
                                      kind="random"), chunk_clips=16)
    writable_store.write_rows("timm/rand", 0, rng.normal(size=(N_CLIPS, SEGMENTS, 6)).astype(np.float16))
    cfg = TrainConfig(head="linear", features=["timm/rand"], train_split="train", val_split="val",
                      out=str(tmp_path / "v"), epochs=1, batch_size=16, progress=False)
    heads.train(cfg, writable_store)
    attrs = heads.predict(writable_store, cfg.out, progress=False).attrs
    assert attrs["random_weights"] is True and attrs["family"] == "video"
    assert attrs["weights_identity"] == {"timm/rand": "RANDOM(seed=4)"}


def test_a_random_backbone_is_flagged_even_on_real_features():
    from heads.predict import prediction_attrs

    info = {"head": "spectrogram_cnn", "head_config": {}, "features": {"logmel": "f"},
            "feature_info": {"logmel": {"random_weights": False, "weights_identity": "n/a"}},
            "backbone_weights": {"kind": "random", "seed": 0}, "train": {"features": ["logmel"]}}
    attrs = prediction_attrs(info)
    assert attrs["random_weights"] is True and attrs["family"] == "audio"
    info["backbone_weights"] = {"kind": "pretrained", "tag": "timm:regnety_064"}
    assert prediction_attrs(info)["random_weights"] is False


def test_clips_without_features_are_skipped_and_counted(writable_store, trained):
    writable_store.set_errors("clip/ViT-B-32", {3: "decode failed"})
    result = heads.predict(writable_store, trained / "c04", name="partial", progress=False)
    assert result.n_skipped == 1 and result.n_clips == N_CLIPS - 1
    assert not writable_store.prediction_done("partial")[3]


def test_the_same_run_resumes_and_another_run_into_its_name_needs_overwrite(writable_store, trained):
    heads.predict(writable_store, trained / "c04", name="twice", progress=False)
    again = heads.predict(writable_store, trained / "c04", name="twice", progress=False)  # same run: resumed
    assert again.n_clips == 0 and again.n_resumed == N_CLIPS
    with pytest.raises(FileExistsError, match="--overwrite"):  # another run (zero-shot) into that name
        heads.predict(writable_store, trained / "c03", name="twice", progress=False)
    assert writable_store.prediction_runs()["twice"]["head"] == "late_fusion"
    assert heads.predict(writable_store, trained / "c03", name="twice", overwrite=True, progress=False).n_clips == N_CLIPS
    assert writable_store.prediction_runs()["twice"]["head"] == "zero_shot"
