"""The trainer on a tiny real store: every head learns, runs are deterministic, best epoch and resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import heads
from heads.checkpoint import load_weights
from heads.config import TrainConfig
from heads.evaluate import evaluate
from heads.predict import load_head
from heads.train import make_loaders

from tests.heads._store import build_store

CLIP3 = ["clip/RN50x4", "clip/RN101", "clip/ViT-B-32"]
# Features and head config of each registered head on the tiny store: a new head must be added here.
SETUPS = {
    "late_fusion": (CLIP3, {}),
    "embedding_mlp": (["timm/test_resnet"], {}),
    "linear": (["clip/RN101", "clip/ViT-B-32"], {}),
    "zero_shot": (["clip/ViT-B-32"], {"class_features": "cliptext/ViT-B-32"}),
    "spectrogram_cnn": (["logmel"], {"backbone": "test_resnet", "resize_to": [32, 24], "freq_mask_width": 4}),
    "frame_cnn": (["frames/16"], {"backbone": "test_resnet", "augment": False}),
}


def config(tmp_path: Path, head: str = "late_fusion", **kw) -> TrainConfig:
    features, head_config = SETUPS[head]
    base = dict(head=head, features=features, head_config=head_config, train_split="train", val_split="val",
                out=str(tmp_path / head), epochs=3, batch_size=16, progress=False)
    return TrainConfig(**{**base, **kw})


def test_every_registered_head_has_a_test_setup():
    assert set(heads.list_heads()) == set(SETUPS)


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_every_head_trains_on_the_store_and_its_loss_goes_down(name, tiny_store, tmp_path):
    result = heads.train(config(tmp_path, name), tiny_store)
    history = result.history
    if name == "zero_shot":  # nothing to train: validated once, saved as epoch 0
        assert [h["epoch"] for h in history] == [0] and history[0]["loss"] is None
        assert result.best_val_accuracy > 0.9
        return
    assert len(history) == 3 and history[-1]["loss"] < history[0]["loss"]
    assert result.best_val_accuracy > 0.5  # 4 classes: chance is 0.25


def test_a_head_learns_separable_data_well_above_chance(tmp_path):
    from featurestore.store import open_store

    store = open_store(build_store(tmp_path / "hard.zarr", n_clips=128, seed=3, separation=0.6))
    result = heads.train(config(tmp_path, "late_fusion", epochs=4, lr=0.02), store)
    store.close()
    assert result.best_val_accuracy >= 0.75, result.history


def test_metrics_log_has_one_line_per_epoch_with_the_documented_fields(tiny_store, tmp_path):
    cfg = config(tmp_path, lr=0.1, lr_milestones=[1, 2])
    heads.train(cfg, tiny_store)
    lines = [json.loads(l) for l in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2, 3]
    assert {"epoch", "loss", "val_accuracy", "val_logloss", "lr", "seconds"} <= set(lines[0])
    assert [l["lr"] for l in lines] == pytest.approx([0.1, 0.01, 0.001])


def test_paper_lr_schedule_divides_by_ten_after_epochs_5_10_15():
    cfg = TrainConfig(head="linear", features=["x"], lr=1.0)
    assert [cfg.lr_at(e) for e in (1, 5, 6, 10, 11, 15, 16, 20)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_two_runs_give_identical_weights(tiny_store, tmp_path):
    a = heads.train(config(tmp_path / "a", "embedding_mlp"), tiny_store)
    b = heads.train(config(tmp_path / "b", "embedding_mlp"), tiny_store)
    wa, wb = load_weights(a.best_weights)[0], load_weights(b.best_weights)[0]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    c = heads.train(config(tmp_path / "c", "embedding_mlp", seed=1), tiny_store)
    wc = load_weights(c.best_weights)[0]
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_best_epoch_is_the_first_with_the_highest_val_accuracy(tmp_path):
    from featurestore.store import open_store

    store = open_store(build_store(tmp_path / "noisy.zarr", n_clips=96, seed=7, separation=0.25))
    cfg = config(tmp_path, "linear", epochs=5, lr=0.2, lr_milestones=[])
    result = heads.train(cfg, store)
    accs = [h["val_accuracy"] for h in result.history]
    assert result.best_epoch == accs.index(max(accs)) + 1
    assert int(load_weights(result.best_weights)[1]["epoch"]) == result.best_epoch
    head, _ = load_head(cfg.out)  # the saved best weights reproduce that epoch's validation
    _, val = make_loaders(cfg, store, head)
    assert evaluate(head, val, torch.device("cpu"))["val_accuracy"] == pytest.approx(max(accs))
    store.close()


def test_an_interrupted_run_resumes_to_the_same_weights(tiny_store, tmp_path):
    full = heads.train(config(tmp_path / "full", epochs=4), tiny_store)

    def interrupt(epoch: int, record: dict) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    cfg = config(tmp_path / "cut", epochs=4)
    with pytest.raises(KeyboardInterrupt):
        heads.train(cfg, tiny_store, on_epoch_end=interrupt)
    state = json.loads((Path(cfg.out) / "state.json").read_text())
    assert state["epoch"] == 2 and not state["finished"]
    resumed = heads.train(cfg, tiny_store)
    assert resumed.epochs_completed == 4 and [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    a = load_weights(Path(full.run_dir) / "ckpt" / "epoch_004.safetensors")[0]
    b = load_weights(Path(cfg.out) / "ckpt" / "epoch_004.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
    again = heads.train(cfg, tiny_store)  # a finished run is not retrained
    assert again.epochs_completed == 4 and len((Path(cfg.out) / "metrics.jsonl").read_text().splitlines()) == 4


def test_a_run_directory_holding_another_run_is_refused(tiny_store, tmp_path):
    heads.train(config(tmp_path, epochs=1), tiny_store)
    with pytest.raises(FileExistsError, match="train.lr"):
        heads.train(config(tmp_path, epochs=1, lr=0.05), tiny_store)
    result = heads.train(config(tmp_path, epochs=1, lr=0.05), tiny_store, overwrite=True)
    assert result.epochs_completed == 1


def test_run_json_records_features_and_fingerprints(tiny_store, tmp_path):
    cfg = config(tmp_path, epochs=1)
    heads.train(cfg, tiny_store)
    info = json.loads((Path(cfg.out) / "run.json").read_text())
    sets = tiny_store.feature_sets()
    assert info["features"] == {name: sets[name].fingerprint for name in CLIP3}
    assert info["head_config"]["input_dims"] == [24, 16, 16] and info["head_config"]["n_classes"] == 4
    assert info["train"]["features"] == CLIP3


def test_head_config_contradicting_the_store_is_refused(tiny_store, tmp_path):
    with pytest.raises(ValueError, match="input_dims"):
        heads.train(config(tmp_path, head_config={"input_dims": [1, 2, 3]}), tiny_store)


def test_fit_trains_on_in_memory_tensors(tmp_path):
    from featurestore.torchdata import TensorBatches

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 2
    x = torch.randn(200, 6, generator=gen) + labels[:, None] * 3.0
    head = heads.create_head("linear", input_dims=[6], n_classes=2)
    cfg = TrainConfig(head="linear", features=["x"], out=str(tmp_path / "mem"), epochs=3, lr=0.1, progress=False)
    result = heads.fit(head, TensorBatches([x], labels, 20, shuffle=True), TensorBatches([x], labels, 50), cfg, {})
    assert result.best_val_accuracy > 0.9


def test_an_unknown_feature_set_is_refused_naming_the_stored_ones(tiny_store, tmp_path):
    from featurestore.errors import UnknownFeatureError

    cfg = config(tmp_path, "linear", features=["clip/RN101", "clip/nope"])
    with pytest.raises(UnknownFeatureError, match="clip/nope.*clip/RN101"):
        heads.train(cfg, tiny_store)
    assert not (tmp_path / "linear").exists()  # refused before the run directory is made


def test_a_batch_cut_to_a_small_split_builds_the_training_dataset_once(tiny_store, tmp_path, monkeypatch):
    """The clamp needs the split's sample count only, which does not depend on the batch size."""
    import importlib

    train_module = importlib.import_module("heads.train")  # heads.train is also the function

    built = []

    class Counting(train_module.StoreDataset):
        def __init__(self, *args, **kwargs):
            built.append(kwargs["level"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(train_module, "StoreDataset", Counting)
    cfg = config(tmp_path, "linear", batch_size=None, val_split=None)
    head, _ = train_module.build_head(cfg, tiny_store)
    head.default_batch_size = 10_000  # larger than the split: cut to it
    train_loader, _ = make_loaders(cfg, tiny_store, head)
    assert built == ["segment"] and train_loader.batch_size == train_loader.n_samples < 10_000
