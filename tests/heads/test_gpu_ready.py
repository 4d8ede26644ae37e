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
    and a batch of 32 dispatches exactly as many ops as a batch of 4 (per-frame torchvision: ~100
    ops and 6 host syncs per frame)."""
    mode, head = on_fake_cuda(heads.create_head(name, **config).train())
    counts = {}
    for batch in (4, 32):
        with mode:
            x = torch.empty(batch, *shape, device="cuda")
        ops = count(mode, head.images, x)
        assert ops.syncs == [] and ops.blocking_h2d == [] and ops.async_h2d == 0, (ops.syncs, ops.blocking_h2d)
        counts[batch] = sum(ops.ops.values())
    assert counts[4] == counts[32] and counts[4] > 10
