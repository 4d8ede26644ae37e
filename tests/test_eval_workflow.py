"""The DCASE workflow across two stores: train on the development store, predict on the evaluation
store (other segment and frame counts, same encoders), fuse and write the submission from it."""
from __future__ import annotations

import csv
import json

import numpy as np
import torch

import featurestore
import heads
from featurestore.demo import make_demo_dataset, make_demo_eval_dataset
from featurestore.extract import extract
from fusion.cli import main as fusion_main

ENCODERS = "logmel,timm/test_resnet@none"
SMALL = dict(width=64, height=48, fps=5, progress=False)


def test_heads_trained_on_the_dev_store_predict_and_submit_on_the_eval_store(tmp_path):
    torch.set_num_threads(1)
    dev_root = make_demo_dataset(tmp_path / "dev", clips_per_class=2, clips_per_location=1, duration=2.0, **SMALL)
    eval_root = make_demo_eval_dataset(tmp_path / "eval", n_clips=6, duration=1.0, **SMALL)
    assert extract(dev_root, tmp_path / "dev.zarr", ENCODERS, frames=2, num_workers=0, progress=False).exit_code == 0
    assert extract(eval_root, tmp_path / "eval.zarr", ENCODERS, frames=1, num_workers=0, progress=False).exit_code == 0

    with featurestore.open_store(tmp_path / "dev.zarr") as dev, featurestore.open_store(tmp_path / "eval.zarr", "a") as ev:
        for name in ("logmel", "timm/test_resnet"):  # another segment count, the same encoder
            assert dev.feature_sets()[name].n_segments != ev.feature_sets()[name].n_segments
            assert dev.feature_sets()[name].fingerprint == ev.feature_sets()[name].fingerprint
        cfg = heads.TrainConfig(head="embedding_mlp", features=["timm/test_resnet"], out=str(tmp_path / "V01"),
                                epochs=2, batch_size=4, progress=False, device="cpu")
        heads.train(cfg, dev)
        heads.predict(ev, tmp_path / "V01", name="V01")
        probs = ev.get_predictions("V01")
        assert probs.shape == (6, 1, 10)
        np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-5)
        test_ids = ev.select(split="fold1_test")

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"name": "V-only", "families": {"V04": ["V01"]},
                                  "postprocess": {"method": "eq1"}}))
    out = tmp_path / "submission.csv"
    assert fusion_main(["submit", "--store", str(tmp_path / "eval.zarr"), "--recipe", str(recipe),
                        "--split", "fold1_test", "--out", str(out)]) == 0
    rows = list(csv.reader(out.open(newline=""), delimiter="\t"))
    assert rows[0][:2] == ["filename", "scene_label"] and len(rows) - 1 == len(test_ids) == 6
    assert [r[0] for r in rows[1:]] == [f"audio/{i}.wav" for i in test_ids]
