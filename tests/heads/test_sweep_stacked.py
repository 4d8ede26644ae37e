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



@pytest.mark.parametrize("name, config", [
    ("linear", {"l2_normalize": True}),
    ("embedding_mlp", {"hidden": [7, 5], "dropout": 0.4, "l2_normalize": True}),
    ("late_fusion", {"hidden": 7, "branch_out": 3, "fusion_hidden": 4, "dropout": 0.4}),
])
def test_every_stacked_forward_is_its_heads_own_forward(name, config):
    """Each entry of `heads._stacked.FORWARDS` mirrors its head's ``forward`` (a change to one without the other
    fails here; the stacked logits are class-major, ``[K, C, B]``): K=3 heads, training (dropout masks from generators seeded as the trainer seeds torch, batch
    statistics, running buffers updated) and eval (running statistics), on per-reader and shared inputs."""
    from heads._registry import create_head
    from heads._stacked import FORWARDS, _Pass

    torch.manual_seed(0)
    dims = [6, 5]
    models = [create_head(name, input_dims=dims, n_classes=4, **config) for _ in range(3)]
    params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]) for n, _ in
              models[0].named_parameters()}
    buffers = {n: torch.stack([dict(m.named_buffers())[n] for m in models]).clone() for n, _ in models[0].named_buffers()}
    inputs = [torch.randn(3, 10, d) for d in dims]  # one batch per trial (three readers)
    stacked = FORWARDS[name](models[0], _Pass(params, buffers, [torch.Generator().manual_seed(s) for s in (7, 8, 9)]),
                             inputs)
    for k, (model, seed) in enumerate(zip(models, (7, 8, 9))):
        torch.manual_seed(seed)
        assert torch.allclose(stacked[k].T, model.train()([x[k] for x in inputs]), atol=1e-5), (name, k)
        for key, value in model.named_buffers():
            assert torch.allclose(buffers[key][k].double(), value.double(), atol=1e-6), (name, key)
    shared = [torch.randn(10, d) for d in dims]  # validation: one batch for all trials
    evaluated = FORWARDS[name](models[0], _Pass(params, buffers, None), shared)
    for k, model in enumerate(models):
        assert torch.allclose(evaluated[k].T, model.eval()(shared), atol=1e-5), (name, k)


@pytest.mark.parametrize("loss, gamma", [("focal", 2.0), ("focal", 0.5), ("focal", 0.0), ("cross_entropy", 2.0)])
def test_the_stacked_loss_and_its_gradient_are_the_lone_losses_through_autograd(loss, gamma):
    """`heads._stacked.stacked_loss` writes the loss's gradient out instead of autograd: each trial's loss and
    gradient by its logits equal `heads.losses.make_loss` of that trial alone, differentiated by autograd
    (confident samples included: p_t near 1 is where the focal weight's derivative matters)."""
    from heads._stacked import stacked_loss
    from heads.losses import make_loss

    torch.manual_seed(0)
    logits, labels = torch.randn(3, 5, 8) * 4, torch.randint(0, 5, (3, 8))  # [K, C, B], [K, B]
    logits[0, labels[0, 0], 0] = 30.0  # p_t rounds to 1
    cfg = TrainConfig(head="linear", features=TWO_SETS, store="s.zarr", loss=loss, focal_gamma=gamma)
    losses, grad = stacked_loss(cfg, logits, labels)
    for k in range(3):
        z = logits[k].T.clone().requires_grad_(True)  # [B, C], as a lone run's head returns them
        lone = make_loss(loss, gamma)(z, labels[k])
        lone.backward()
        assert losses[k].item() == pytest.approx(lone.item(), rel=1e-6, abs=1e-7), (loss, gamma, k)
        assert torch.allclose(grad[k].T, z.grad, rtol=1e-5, atol=1e-7), (loss, gamma, k)


def test_bf16_trials_are_never_stacked_the_stacked_step_has_no_autocast(tmp_path):
    """A `--precision bf16` sweep must train what its runs record: stacked trials would run in float32."""
    from heads._stacked import can_stack, group_key

    fp32 = TrainConfig(head="linear", features=TWO_SETS, store="s.zarr", train_split="train", val_split="val",
                       out=str(tmp_path / "a"))
    bf16 = TrainConfig(**{**fp32.to_dict(), "precision": "bf16"})
    assert can_stack(fp32)
    assert not can_stack(bf16)
    assert group_key(fp32) != group_key(bf16)
