"""Stacked sweeps of the MLP heads: dropout masks and batchnorm statistics per trial, equal to lone runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import heads
from heads.config import TrainConfig

TWO_SETS = ["clip/RN101", "clip/ViT-B-32"]


def _sweep(store: Path, out: Path, head: str, head_config: dict, grid: dict, stack: bool) -> heads.SweepResult:
    base = TrainConfig(head=head, features=TWO_SETS, store=str(store), train_split="train", val_split="val",
                       epochs=2, batch_size=16, head_config=head_config, progress=False)
    return heads.sweep(base, grid, seeds=[0, 1], out=out, stack=stack)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("head, head_config, grid", [
    ("embedding_mlp", {"hidden": [8, 6], "dropout": 0.3}, {"lr": [0.1, 0.01], "weight_decay": [0.0, 0.01]}),
    ("late_fusion", {"hidden": 8, "branch_out": 4, "fusion_hidden": 4, "dropout": 0.3}, {"lr": [0.1, 0.01]}),
])
def test_stacked_mlp_trials_equal_lone_runs(tiny_store_path, tmp_path, head, head_config, grid):
    """Each stacked trial (its own dropout masks, batchnorm statistics and running buffers, lr, weight decay,
    momentum and seed) ends where the same trial trained alone ends, within float tolerance: weights,
    batchnorm buffers, momentum buffers and every epoch's metrics."""
    stacked = _sweep(tiny_store_path, tmp_path / "stacked", head, head_config, grid, stack=True)
    alone = _sweep(tiny_store_path, tmp_path / "alone", head, head_config, grid, stack=False)
    assert stacked.trained == alone.trained == len(stacked.trials) >= 4
    for trial in stacked.trials:
        a, b = trial.run_dir, tmp_path / "alone" / trial.run_dir.relative_to(tmp_path / "stacked")
        for name in ("best.safetensors", "ckpt/epoch_002.safetensors", "ckpt/epoch_002.optim.safetensors"):
            wa, wb = load_file(a / name), load_file(b / name)
            assert wa.keys() == wb.keys(), (trial.config, name)
            for key in wa:
                assert torch.allclose(wa[key].double(), wb[key].double(), rtol=1e-4, atol=1e-5), (trial.config, key)
        assert any("running_var" in key for key in load_file(a / "best.safetensors"))  # buffers compared too
        for x, y in zip(_metrics(a), _metrics(b), strict=True):
            assert x["val_accuracy"] == y["val_accuracy"] and x["lr"] == y["lr"], trial.config
            for key in ("loss", "val_logloss", "val_segment_accuracy"):
                assert x[key] == pytest.approx(y[key], abs=1e-5), (trial.config, key)
    assert [r["config"] for r in stacked.rows] == [r["config"] for r in alone.rows]

