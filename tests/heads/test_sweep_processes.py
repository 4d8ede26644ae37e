"""Sweeps of heads that cannot be stacked (worker processes), and a sweep's best run as a fusion recipe's run."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import heads
from heads.config import TrainConfig

CNN = {"backbone": "test_resnet", "resize_to": [32, 24], "freq_mask_width": 4}


def test_cnn_trials_train_in_worker_processes_each_equal_to_a_lone_run(tiny_store_path, tmp_path, monkeypatch):
    """The workers read the store themselves: this process reads no feature row while they train, and what each
    is sent is its trial's config (a path to the store, no features)."""
    import pickle

    import joblib

    from featurestore.store.store import FeatureStore

    base = TrainConfig(head="spectrogram_cnn", features=["logmel"], store=str(tiny_store_path), train_split="train",
                       val_split="val", epochs=1, batch_size=16, head_config=CNN, progress=False)
    reads, sent, original = [], [], FeatureStore.read_rows
    monkeypatch.setattr(FeatureStore, "read_rows", lambda self, name, *a, **kw: reads.append(name) or original(
        self, name, *a, **kw))
    delayed = joblib.delayed

    def recording(function):  # what the parent hands each worker: the pickled call
        return lambda *args, **kwargs: sent.append(len(pickle.dumps((args, kwargs)))) or delayed(function)(*args, **kwargs)

    monkeypatch.setattr(joblib, "delayed", recording)
    result = heads.sweep(base, {"lr": [0.01]}, seeds=[0, 1], out=tmp_path / "sw", jobs=2)
    assert [t["trained"] for t in result.per_trial] == ["process", "process"]
    assert reads == [] and len(sent) == 2 and max(sent) < 4096, (reads, sent)  # the store's rows: 64 x 4 x 20 x 16
    assert _loky_workers() == []  # gone with the sweep, not idling for minutes (they kept a pytest worker from exiting)
    monkeypatch.undo()
    lone = heads.train(TrainConfig(**{**base.to_dict(), "lr": 0.01, "seed": 1, "out": str(tmp_path / "lone")}))
    a, b = load_file(lone.best_weights), load_file(tmp_path / "sw" / "lr=0.01" / "seed_1" / "best.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k].double(), b[k].double(), rtol=1e-5, atol=1e-6) for k in a)
    assert result.per_trial[1]["val_logloss"] == pytest.approx(lone.best_val_logloss, abs=1e-5)
    # a rerun starts no process: both trials are finished
    again = heads.sweep(base, {"lr": [0.01]}, seeds=[0, 1], out=tmp_path / "sw", jobs=2)
    assert again.trained == 0 and [t["trained"] for t in again.per_trial] == ["no", "no"]


def test_a_fusion_recipe_names_a_sweeps_best_run(writable_store, tmp_path):
    """``heads predict --run DIR/best/seed_0 --name C04`` then a recipe family ``C04``: the fused clip accuracy on
    the validation split is the best configuration's validation accuracy (one seed, one head: nothing to fuse)."""
    from fusion.pipeline import fuse
    from fusion.recipe import FusionRecipe

    base = TrainConfig(head="linear", features=["clip/RN101"], train_split="train", val_split="val", epochs=1,
                       batch_size=16, progress=False)
    result = heads.sweep(base, {"lr": [0.1, 0.001]}, seeds=[0], out=tmp_path / "sw", store=writable_store)
    heads.predict(writable_store, tmp_path / "sw" / "best" / "seed_0", name="C04", progress=False)
    recipe = FusionRecipe.from_dict({"name": "best_of_sweep", "families": {"C04": ["C04"]}, "eval_split": "val"})
    out = fuse(writable_store, recipe, "val")
    accuracy = float(np.mean(out.final.argmax(1) == out.labels))
    assert accuracy == pytest.approx(result.best["mean"], abs=1e-9)


def _loky_workers() -> list[str]:
    """Command lines of this process's children that are loky worker processes."""
    children = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        children.update((task / "children").read_text().split())
    lines = []
    for pid in children:
        try:
            lines.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:  # exited meanwhile
            continue
    return [line for line in lines if "popen_loky" in line]
