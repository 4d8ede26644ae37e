"""What a GPU needs from training, proven on the CPU: fake CUDA tensors (`FakeTensorMode`: shapes,
dtypes and devices without a device) under a dispatch mode that counts what would stall one.

A *host sync* is an op that reads a device value back to the host (``aten._local_scalar_dense``:
``.item()``, ``bool(t)``, ``float(t)``) or whose output size depends on device data (``nonzero``);
a *blocking host-to-device copy* is a ``_to_copy``/``copy_`` from the CPU to CUDA without
``non_blocking`` (a CPU tensor built per call and moved, as torchvision's per-frame transforms do).
Counting dispatched ops for two batch sizes shows whether the work per batch grows with it.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import heads

aten = torch.ops.aten
_SYNCS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten.equal.default}


class DeviceOps(TorchDispatchMode):
    """Counts dispatched aten ops, host syncs and host-to-device copies (blocking or not)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.syncs: list[str] = []
        self.blocking_h2d: list[str] = []
        self.async_h2d = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = str(func)
        if not name.startswith("prim."):
            self.ops[name] += 1
        self._copies(func, args, kwargs)
        if func in _SYNCS:
            self.syncs.append(name)
            if func is aten._local_scalar_dense.default:
                return 1  # a fake tensor has no value; the count is what matters
        return func(*args, **kwargs)

    def _copies(self, func: Any, args: tuple, kwargs: dict) -> None:
        if func is aten._to_copy.default:
            src, dst, blocking = args[0], kwargs.get("device"), not kwargs.get("non_blocking", False)
        elif func is aten.copy_.default:
            dst, src = args[0].device, args[1]
            blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
        else:
            return
        if isinstance(src, torch.Tensor) and src.device.type == "cpu" and dst is not None \
                and torch.device(dst).type == "cuda":
            if blocking:
                self.blocking_h2d.append(f"{func} {tuple(src.shape)}")
            else:
                self.async_h2d += 1


def on_fake_cuda(head: torch.nn.Module) -> tuple[FakeTensorMode, torch.nn.Module]:
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        return mode, head.to("cuda")


def count(mode: FakeTensorMode, fn: Any, *args: Any) -> DeviceOps:
    with mode, DeviceOps() as ops:
        fn(*args)
    return ops


FRAME = dict(backbone="test_resnet", n_classes=4, input_shape=[3, 32, 32])
SPEC = dict(backbone="test_resnet", n_classes=4, input_shape=[20, 16], resize_to=[20, 16])


@pytest.mark.parametrize("name, config, shape", [("frame_cnn", FRAME, (3, 32, 32)),
                                                 ("frame_cnn", {**FRAME, "color_jitter": [0.4, 0.4, 0.4, 0.1],
                                                                "image_size": 24}, (3, 32, 32)),
                                                 ("spectrogram_cnn", SPEC, (20, 16))])
def test_training_images_need_no_host_sync_nor_blocking_copy_and_as_many_ops_for_any_batch(name, config, shape):
    """The augmentation runs batched on the device: no value is read back, no constant is copied in,
    and a batch of 32 dispatches exactly as many ops as a batch of 4 (per-frame torchvision: ~70
    ops, 6 host syncs and 3 blocking copies per frame)."""
    mode, head = on_fake_cuda(heads.create_head(name, **config).train())
    counts = {}
    for batch in (4, 32):
        with mode:
            x = torch.empty(batch, *shape, device="cuda")
        ops = count(mode, head.images, x)
        assert ops.syncs == [] and ops.blocking_h2d == [] and ops.async_h2d == 0, (ops.syncs, ops.blocking_h2d)
        counts[batch] = sum(ops.ops.values())
    assert counts[4] == counts[32] and counts[4] > 10


HEADS = {"late_fusion": ({"input_dims": [24, 16], "n_classes": 4}, [(24,), (16,)], torch.float16),
         "frame_cnn": (FRAME, [(3, 32, 32)], torch.uint8),
         "spectrogram_cnn": (SPEC, [(20, 16)], torch.float16)}


def cpu_batch(name: str, n: int = 8) -> Any:
    from featurestore.torchdata import Batch

    _, shapes, dtype = HEADS[name]
    return Batch([torch.zeros(n, *shape, dtype=dtype) for shape in shapes], torch.arange(n) % 4, torch.arange(n),
                 torch.zeros(n, dtype=torch.long))


@pytest.mark.parametrize("name", sorted(HEADS))
def test_a_training_steps_forward_reads_nothing_back_and_each_input_is_copied_once_without_blocking(name):
    """`Batch.to` copies each stored-dtype input (and the labels) once, non-blocking, and converts it
    there; the forward pass and the loss (added to the epoch's tally) run without a host sync; the
    epoch's loss is read back once. (Fake CUDA has no backward: see the next test for the update.)"""
    from heads.losses import make_loss
    from heads.train import LossTally, forward_loss

    config, shapes, _ = HEADS[name]
    mode, head = on_fake_cuda(heads.create_head(name, **config).train())
    with mode:
        tally = LossTally(torch.device("cuda"))
    batch = cpu_batch(name)
    moved: list = []
    copies = count(mode, lambda: moved.append(batch.to("cuda")))
    assert copies.async_h2d == len(shapes) + 1 and copies.blocking_h2d == [] and copies.syncs == []
    assert all(x.device.type == "cuda" and x.dtype == torch.float32 for x in moved[0].inputs)
    step = count(mode, forward_loss, head, moved[0], make_loss("focal"), tally)
    assert step.syncs == [] and step.blocking_h2d == [] and step.async_h2d == 0, (step.syncs, step.blocking_h2d)
    assert count(mode, tally.result).syncs == ["aten._local_scalar_dense.default"] * 3  # one tolist() of 3 values


@pytest.mark.parametrize("name", sorted(HEADS))
def test_backward_and_the_sgd_update_read_nothing_back(name):
    """The rest of `train_step` on real CPU tensors: no op of backward or of SGD (momentum, weight
    decay) reads a value back, so none would wait for a GPU."""
    from heads.losses import make_loss
    from heads.train import LossTally, train_step

    config, _, _ = HEADS[name]
    head = heads.create_head(name, **config).train()
    optimizer = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    tally = LossTally(torch.device("cpu"))
    batch = cpu_batch(name).to("cpu")
    for _ in range(2):  # the second step updates the momentum buffers
        with DeviceOps() as ops:
            train_step(head, batch, optimizer, make_loss("focal"), tally)
        assert ops.syncs == [] and sum(ops.ops.values()) > 20
    assert tally.steps == 2 and np.isfinite(tally.result()[0])




def test_the_trainers_loaders_keep_the_stored_dtype_and_convert_on_the_device(tiny_store, tmp_path):
    """uint8 frames and float16 embeddings leave the loader as stored; `fit`'s `DeviceBatches` makes
    them float32 on the device, equal to what a float32 loader gives."""
    from heads.train import DeviceBatches, build_head, make_loaders

    for name, features in (("frame_cnn", ["frames/16"]), ("late_fusion", ["clip/RN101", "clip/ViT-B-32"])):
        cfg = heads.TrainConfig(head=name, features=features, train_split="train", val_split="val", batch_size=8,
                                out=str(tmp_path / name), head_config={"backbone": "test_resnet"} if name == "frame_cnn"
                                else {}, device="cpu", progress=False)
        head, _ = build_head(cfg, tiny_store)
        stored = make_loaders(cfg, tiny_store, head, torch.device("cpu"))
        floats = make_loaders(cfg, tiny_store, head)
        expected = torch.uint8 if name == "frame_cnn" else torch.float16
        for kept, converted in zip(stored, floats):
            kept.set_epoch(1)
            converted.set_epoch(1)
            first, reference = next(iter(kept)), next(iter(converted))
            assert {x.dtype for x in first.inputs} == {expected}
            assert {x.dtype for x in reference.inputs} == {torch.float32}
            on_device = next(iter(DeviceBatches(kept, torch.device("cpu"))))
            assert all(torch.equal(a, b) for a, b in zip(on_device.inputs, reference.inputs))


def test_bf16_autocast_is_an_option_recorded_in_the_run(tiny_store, tmp_path):
    """``precision="bf16"``: the head's forward runs in bfloat16 (the loss in float32), run.json records
    it, and the run cannot be resumed in float32 (another run)."""
    import json

    captured = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: captured.append(out.dtype) if isinstance(module, torch.nn.Linear) else None)
    cfg = heads.TrainConfig(head="late_fusion", features=["clip/RN101", "clip/ViT-B-32"], train_split="train",
                            val_split="val", out=str(tmp_path / "run"), epochs=1, batch_size=16, device="cpu",
                            precision="bf16", progress=False)
    try:
        result = heads.train(cfg, tiny_store)
    finally:
        hook.remove()
    assert set(captured) == {torch.bfloat16} and np.isfinite(result.history[0]["loss"])
    assert json.loads((tmp_path / "run" / "run.json").read_text())["train"]["precision"] == "bf16"
    with pytest.raises(FileExistsError, match="train.precision"):
        heads.train(heads.TrainConfig(**{**cfg.to_dict(), "precision": "fp32", "epochs": 2}), tiny_store)
