"""Hostile training runs: a resumed run computes what a clean run computes, on the data it names, or is refused.

The store changing under an unfinished run (feature values rewritten with the same provenance, clips
appended to its split) must never be mixed into its later epochs; a run killed between its checkpoint
and ``state.json`` resumes to a clean run's weights; the reported metrics equal numpy on the run's own
predictions; a loaded head predicts clips in the order it is given them, in the store's class order.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import heads
from featurestore import ClipRecord, Manifest
from featurestore.store import open_store
from heads.checkpoint import load_weights
from heads.config import TrainConfig
from heads.trained import TrainedHead

from tests.heads._store import CLASSES, SEGMENTS, build_store

train_module = importlib.import_module("heads.train")  # `heads.train` the attribute is the function

FEATURE = "timm/test_resnet"
N = 32  # 24 train clips, 8 val clips; chunks of 16 clips, so 16 appended clips are one whole chunk


def config(out: Path, **kw) -> TrainConfig:
    base = dict(head="embedding_mlp", features=[FEATURE], train_split="train", val_split="val", out=str(out),
                epochs=2, batch_size=16, progress=False, seed=3)
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def store(tmp_path: Path):
    opened = open_store(build_store(tmp_path / "s.zarr", n_clips=N), mode="a")
    yield opened
    opened.close()


def _stop_after_epoch_1(epoch: int, record: dict) -> None:
    if epoch == 1:
        raise KeyboardInterrupt


def _one_epoch_of_two(cfg: TrainConfig, store) -> None:
    with pytest.raises(KeyboardInterrupt):
        heads.train(cfg, store, on_epoch_end=_stop_after_epoch_1)
    assert json.loads((Path(cfg.out) / "state.json").read_text())["epoch"] == 1


def _append_clips(store, n: int, split: str, label: str | None = "bus") -> None:
    start = store.n_clips
    clips = [ClipRecord(clip_id=f"new-{start + i}", label=label, city="city", location="city-new",
                        splits=frozenset({split})) for i in range(n)]
    store.append_clips(Manifest("tiny", list(CLASSES), clips, audio_segments=SEGMENTS, video_frames=SEGMENTS))
    dim = store.feature_info(FEATURE).feature_shape[0]
    values = np.random.default_rng(1).normal(size=(n, SEGMENTS, dim)).astype(np.float16)
    store.write_rows(FEATURE, start, values)


def test_a_resume_after_the_features_were_rewritten_with_other_values_is_refused(store, tmp_path):
    cfg = config(tmp_path / "run")
    _one_epoch_of_two(cfg, store)
    before = (Path(cfg.out) / "ckpt" / "epoch_001.safetensors").read_bytes()
    values = np.asarray(store.read_rows(FEATURE, 0, N), dtype=np.float32)
    store.write_rows(FEATURE, 0, (-values).astype(np.float16))  # same provenance, same fingerprint
    with pytest.raises(FileExistsError, match=f"data.data_versions.{FEATURE}"):
        heads.train(cfg, store)
    assert (Path(cfg.out) / "ckpt" / "epoch_001.safetensors").read_bytes() == before  # nothing trained on
    assert heads.train(cfg, store, overwrite=True).epochs_completed == 2  # the way out: train afresh


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_resume_after_clips_were_appended_to_its_training_or_validation_split_is_refused(store, tmp_path, split):
    cfg = config(tmp_path / "run")
    _one_epoch_of_two(cfg, store)
    _append_clips(store, 16, split)
    with pytest.raises(FileExistsError, match=f"data.splits.{split}"):
        heads.train(cfg, store)
    assert json.loads((Path(cfg.out) / "state.json").read_text())["epoch"] == 1


def test_clips_appended_to_another_split_do_not_stop_a_resume_and_it_equals_a_clean_run(store, tmp_path):
    clean = heads.train(config(tmp_path / "clean"), store)
    cfg = config(tmp_path / "cut")
    _one_epoch_of_two(cfg, store)
    _append_clips(store, 16, "other")  # neither split of the run: what it trains on is unchanged
    resumed = heads.train(cfg, store)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in clean.history]
    a = load_weights(Path(clean.run_dir) / "best.safetensors")[0]
    b = load_weights(Path(cfg.out) / "best.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_with_another_seed_or_features_is_refused(store, tmp_path):
    cfg = config(tmp_path / "run")
    _one_epoch_of_two(cfg, store)
    with pytest.raises(FileExistsError, match="train.seed"):
        heads.train(config(tmp_path / "run", seed=4), store)
    with pytest.raises(FileExistsError, match="features"):
        heads.train(config(tmp_path / "run", features=["clip/RN101"]), store)


def test_a_run_killed_between_its_checkpoint_and_state_json_resumes_to_a_clean_runs_weights(
        store, tmp_path, monkeypatch):
    clean = heads.train(config(tmp_path / "clean"), store)
    cfg = config(tmp_path / "cut")
    real = train_module.write_json
    calls = {"state": 0}

    def dies_at_the_second_commit(path: Path, data: dict) -> None:
        if Path(path).name == "state.json":
            calls["state"] += 1
            if calls["state"] == 2:
                raise KeyboardInterrupt  # the kill: epoch 2's checkpoint and metrics line are written
        real(path, data)

    monkeypatch.setattr(train_module, "write_json", dies_at_the_second_commit)
    with pytest.raises(KeyboardInterrupt):
        heads.train(cfg, store)
    monkeypatch.setattr(train_module, "write_json", real)
    assert json.loads((Path(cfg.out) / "state.json").read_text())["epoch"] == 1
    resumed = heads.train(cfg, store)
    lines = [json.loads(l) for l in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]  # the uncommitted epoch's line is not kept twice
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in clean.history]
    a = load_weights(Path(clean.run_dir) / "best.safetensors")[0]
    b = load_weights(Path(cfg.out) / "best.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (Path(cfg.out) / "ckpt").iterdir()) == [
        "epoch_002.optim.safetensors", "epoch_002.safetensors"]


def test_reported_metrics_equal_numpy_on_the_runs_own_predictions(store, tmp_path):
    result = heads.train(config(tmp_path / "run", epochs=1, lr=0.002), store)
    trained = TrainedHead.load(result.run_dir, device="cpu")
    assert trained.classes == list(store.classes) == CLASSES
    ids = store.select(split="val")
    probs = trained.predict_proba({FEATURE: store.get_many(FEATURE, ids)}).mean(axis=1)
    labels = np.asarray(store.labels)[store.rows(ids)]
    record = result.history[0]
    assert record["val_clips"] == len(ids) == 8
    assert record["val_accuracy"] == pytest.approx(float((probs.argmax(1) == labels).mean()), abs=1e-12)
    picked = np.clip(probs[np.arange(len(ids)), labels], 1e-15, 1.0)
    assert record["val_logloss"] == pytest.approx(float(-np.log(picked).mean()), rel=1e-5)
    assert result.best_val_accuracy == record["val_accuracy"] and result.best_val_logloss == record["val_logloss"]
    assert 0 < record["val_logloss"] < 10


def test_a_loaded_head_predicts_clips_in_the_order_it_is_given(store, tmp_path):
    result = heads.train(config(tmp_path / "run", epochs=1), store)
    trained = TrainedHead.load(result.run_dir, device="cpu")
    ids = store.select(split="val")
    forward = trained.predict_proba({FEATURE: store.get_many(FEATURE, ids)})
    backward = trained.predict_proba({FEATURE: store.get_many(FEATURE, ids[::-1])})
    np.testing.assert_allclose(backward, forward[::-1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(forward[0], forward[1])  # different clips: the order is observable
    one = trained.predict_proba({FEATURE: store.get(FEATURE, ids[2])})
    np.testing.assert_allclose(one, forward[2], rtol=1e-5, atol=1e-6)


def test_a_split_missing_a_class_still_trains_every_class_of_the_store_in_its_order(tmp_path):
    """Training on a split without 'tram' clips keeps 4 outputs in the store's order, not 3 relabelled ones."""
    store = open_store(build_store(tmp_path / "s.zarr", n_clips=N), mode="a")
    _append_clips(store, 16, "no_tram", label="park")
    _append_clips(store, 16, "no_tram", label="airport")
    result = heads.train(config(tmp_path / "run", train_split="no_tram", epochs=1), store)
    trained = TrainedHead.load(result.run_dir, device="cpu")
    store.close()
    info = json.loads((Path(result.run_dir) / "run.json").read_text())
    assert info["classes"] == CLASSES and info["head_config"]["n_classes"] == 4
    probs = trained.predict_proba({FEATURE: np.zeros((2, SEGMENTS, 12), np.float32)})
    assert probs.shape == (2, SEGMENTS, 4)


def test_an_unlabelled_clip_in_the_training_split_is_refused_in_one_line(tmp_path):
    store = open_store(build_store(tmp_path / "s.zarr", n_clips=N), mode="a")
    _append_clips(store, 16, "train", label=None)
    with pytest.raises(ValueError, match=r"16 selected clip\(s\) have no label") as err:
        heads.train(config(tmp_path / "run", epochs=1), store)
    store.close()
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "best.safetensors").exists()


def test_an_old_run_json_without_the_data_record_still_resumes(store, tmp_path):
    """Runs made before the data record was kept resume as before (their data cannot be checked)."""
    clean = heads.train(config(tmp_path / "clean"), store)
    cfg = config(tmp_path / "cut")
    _one_epoch_of_two(cfg, store)
    path = Path(cfg.out) / "run.json"
    info = json.loads(path.read_text())
    assert set(info["data"]) == {"data_versions", "splits"} and set(info["data"]["splits"]) == {"train", "val"}
    del info["data"]
    path.write_text(json.dumps(info))
    resumed = heads.train(cfg, store)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in clean.history]



def _append_to_two_splits(store, n: int, splits: frozenset) -> None:
    start = store.n_clips
    clips = [ClipRecord(clip_id=f"two-{start + i}", label="bus", city="city", location="city-two", splits=splits)
             for i in range(n)]
    store.append_clips(Manifest("tiny", list(CLASSES), clips, audio_segments=SEGMENTS, video_frames=SEGMENTS))
    dim = store.feature_info(FEATURE).feature_shape[0]
    store.write_rows(FEATURE, start, np.random.default_rng(2).normal(size=(n, SEGMENTS, dim)).astype(np.float16))


@pytest.mark.parametrize("case", ["the training split itself", "a split sharing 16 clips"])
def test_a_validation_split_sharing_clips_with_the_training_split_is_refused(store, tmp_path, case):
    """``val_split`` the training split reported accuracy 1.0 and chose the best epoch on the clips it
    trained on; a validation split sharing any clip with the training split is refused in one line,
    naming both and how many, before the run directory is written. Without one, training goes on."""
    if case == "the training split itself":
        cfg, expected = config(tmp_path / "run", val_split="train"), "val_split 'train' shares 24 clip"
    else:
        _append_to_two_splits(store, 16, frozenset({"train", "extra"}))
        cfg, expected = config(tmp_path / "run", val_split="extra"), "val_split 'extra' shares 16 clip"
    with pytest.raises(ValueError, match=expected) as err:
        heads.train(cfg, store)
    assert "\n" not in str(err.value) and "train_split 'train'" in str(err.value)
    assert not (Path(cfg.out) / "run.json").exists()
    heads.train(config(tmp_path / "last", val_split=None, epochs=1), store)
    assert (tmp_path / "last" / "run.json").exists()


def test_a_finished_run_rerun_after_its_features_were_rewritten_is_refused_not_called_done(store, tmp_path):
    """All epochs done, then the set rewritten with the same provenance: the rerun said "nothing to
    do" and reported the old data's metrics as this store's."""
    cfg = config(tmp_path / "run", epochs=1)
    heads.train(cfg, store)
    values = np.asarray(store.read_rows(FEATURE, 0, N), dtype=np.float32)
    store.write_rows(FEATURE, 0, (-values).astype(np.float16))
    with pytest.raises(FileExistsError, match=f"data.data_versions.{FEATURE}"):
        heads.train(cfg, store)
    assert heads.train(cfg, store, overwrite=True).nothing_to_do is False  # the way out: train afresh


def test_a_finished_run_with_unchanged_data_is_still_nothing_to_do(store, tmp_path):
    cfg = config(tmp_path / "run", epochs=1)
    heads.train(cfg, store)
    _append_clips(store, 16, "other")  # another split: not this run's data
    assert heads.train(cfg, store).nothing_to_do


def test_heads_train_into_a_sweep_directory_is_refused(store, tmp_path):
    out = tmp_path / "sweep"
    heads.sweep(config(out, epochs=1), {"lr": [0.1]}, seeds=[0], store=store)
    with pytest.raises(FileExistsError, match="is a `heads sweep` directory"):
        heads.train(config(out, epochs=1), store)
    assert (out / "sweep.json").is_file() and not (out / "run.json").exists()


@pytest.mark.parametrize("field", ["lr", "weight_decay", "lr_gamma"])
def test_rates_past_float32_are_refused_naming_the_field(tmp_path, field):
    from heads.config import ConfigError

    with pytest.raises(ConfigError, match=field):
        config(tmp_path / "run", **{field: 1e39})


def test_heads_sweep_without_store_names_the_sweep_command(tmp_path, capsys):
    from heads.cli import main

    code = main(["sweep", "--head", "linear", "--features", FEATURE, "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and "sweep needs --store" in err and "train needs" not in err


def test_a_key_given_twice_in_a_training_recipe_is_refused_naming_it(tmp_path):
    """Before: JSON kept the last value, so the first ``head_config`` (or ``lr``) vanished silently."""
    from heads.config import ConfigError

    recipe = tmp_path / "r.json"
    recipe.write_text('{"head": "embedding_mlp", "features": ["x"], "lr": 0.1, '
                      '"head_config": {"hidden": [32], "hidden": [64]}, "lr": 0.5}', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"key\(s\) 'head_config.hidden', 'lr' given more than once"):
        TrainConfig.from_json(recipe)
