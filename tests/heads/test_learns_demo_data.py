"""A head learns the synthetic demo data (real WAV/MP4 files -> extraction -> store) well above chance."""
from __future__ import annotations

import torch

import featurestore
import heads
from featurestore.demo import make_demo_dataset
from featurestore.extract import extract


def test_frame_mlp_beats_chance_on_held_out_demo_clips(tmp_path):
    torch.set_num_threads(1)
    root = make_demo_dataset(tmp_path / "data", clips_per_class=6, duration=1.0, width=64, height=48, fps=5,
                             seed=0, progress=False)
    summary = extract(root, tmp_path / "s.zarr", encoders="timm/test_resnet@none", frames=3, num_workers=0,
                      progress=False)
    assert summary.exit_code == 0
    with featurestore.open_store(tmp_path / "s.zarr", "a") as store:
        # No validation split: the last epoch is kept, so fold1_evaluate stays truly held out.
        cfg = heads.TrainConfig(head="embedding_mlp", features=["timm/test_resnet"], out=str(tmp_path / "run"),
                                val_split=None, epochs=30, batch_size=16, lr=0.05, lr_milestones=[20, 25],
                                progress=False, device="cpu", seed=0)
        heads.train(cfg, store)
        heads.predict(store, tmp_path / "run", name="mlp")
        held_out = store.select(split="fold1_evaluate")
        assert not set(held_out) & set(store.select(split="fold1_train"))
        probs = store.get_predictions("mlp", held_out).mean(axis=1)
        labels = store.labels[store.rows(held_out)]
    accuracy = float((probs.argmax(axis=1) == labels).mean())
    chance = 1 / 10
    assert len(held_out) >= 20 and accuracy >= 3 * chance, accuracy
