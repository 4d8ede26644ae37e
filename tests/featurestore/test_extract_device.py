"""The encode lane on an accelerator never makes the host wait (issue 21 item 4), checked without a GPU.

The encoders run on fake CUDA tensors (``FakeTensorMode``: shapes, dtypes and devices, no data), and
a dispatch mode records every operator the encode lane issues: copies to the device must be one per
decoded tensor per batch however many encoders read it, all non-blocking, and nothing may wait for
the device (``.item()``, a blocking copy back, ``nonzero``...).
"""
from __future__ import annotations

import numpy as np
import torch
from tests.featurestore.test_extract_support import write_mp4
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from featurestore.encoders import create_encoder
from featurestore.encoders._preprocess import _channel_stats
from featurestore.extract import pipeline
from featurestore.extract.pipeline import RunStats, _forget_taken, _Lane, _prefetch
from featurestore.extract.plan import Source, Target
from featurestore.extract.transfers import INFLIGHT_BATCHES, DeviceCopies, lane_device
from featurestore.extract.workers import ClipDecoder, DecodedBatch, collate, make_job

CUDA = torch.device("cuda")
_SYNCS = {"aten._local_scalar_dense.default", "aten.item.default", "aten.nonzero.default",
          "aten.equal.default", "aten.is_nonzero.default"}


class _Transfers(TorchDispatchMode):
    """Records host-to-device copies (with their ``non_blocking``) and every op that waits for the device."""

    def __init__(self):
        super().__init__()
        self.to_device: list[bool] = []
        self.waits: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name in _SYNCS:
            self.waits.append(name)
        elif name == "aten._to_copy.default":
            self._copy(args[0].device, torch.device(kwargs.get("device") or args[0].device),
                       bool(kwargs.get("non_blocking", False)), name)
        elif name == "aten.copy_.default":
            self._copy(args[1].device, args[0].device, bool(args[2]) if len(args) > 2 else
                       bool(kwargs.get("non_blocking", False)), name)
        return func(*args, **kwargs)

    def _copy(self, src: torch.device, dst: torch.device, non_blocking: bool, name: str) -> None:
        if src.type == "cpu" and dst.type == "cuda":
            self.to_device.append(non_blocking)
        elif src.type == "cuda" and dst.type == "cpu" and not non_blocking:
            self.waits.append(f"{name} to the host, blocking")


def _target(name: str, spec: str, n_rows: int) -> Target:
    enc = create_encoder(spec)
    return Target(name, enc, enc.spec, Source("frames", 2), enc.output_shape, enc.dtype, n_rows, {},
                  np.ones(n_rows, dtype=bool))


def test_encode_lanes_copy_each_shared_input_once_per_batch_and_never_wait_for_the_device():
    """Two image encoders reading the same uint8 frames (as RN101 and ViT-B/32 do), two decode
    batches: two copies to the device (not four), all non-blocking, no host sync; the outputs stay
    in flight (``INFLIGHT_BATCHES``) instead of being waited for."""
    n_rows, clips_per_batch = 2 * INFLIGHT_BATCHES, 2
    targets = [_target("a", "timm/test_vit@none", n_rows), _target("b", "timm/test_resnet@none", n_rows)]
    frames = np.random.default_rng(0).integers(0, 256, (n_rows * 2, 48, 64, 3), dtype=np.uint8)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            for t in targets:
                t.encoder.module.to(CUDA)
                t.encoder.device = CUDA
                # mean/std are made on the device once per process (cached): not part of the loop
                t.encoder.preprocessor().batched(torch.zeros((1, 48, 64, 3), dtype=torch.uint8, device=CUDA))
            copies = DeviceCopies(CUDA)
            lanes = [_Lane(j, t, [(0, n_rows)], clips_per_batch, n_rows, CUDA, None, RunStats(),
                           t.encoder.preprocessor().batched, copies) for j, t in enumerate(targets)]
            with _Transfers() as seen:
                for lo in range(0, n_rows, clips_per_batch):
                    rows = np.arange(lo, lo + clips_per_batch)
                    x = torch.from_numpy(frames[lo * 2:(lo + clips_per_batch) * 2].copy())  # a decoded batch
                    batch = DecodedBatch(rows, {0: (rows, x), 1: (rows, x)}, {}, {})
                    _prefetch(batch, lanes)
                    for lane in lanes:
                        for group_rows, group in batch.groups(lane.j):
                            lane.add(group_rows, group, {})
                    _forget_taken(lanes)
    finally:
        _channel_stats.cache_clear()  # fake CUDA mean/std must not outlive the fake mode
    assert seen.to_device == [True] * INFLIGHT_BATCHES, seen.to_device
    assert seen.waits == []
    assert [len(lane.inflight) for lane in lanes] == [INFLIGHT_BATCHES] * 2
    assert all(not lane.batches and not lane.pending for lane in lanes)
    assert not copies._copies  # nothing pending: every device copy let go


def test_parameter_free_frames_encoder_runs_on_the_host_beside_accelerator_encoders():
    frames = _target("frames/32", "frames/32", 4)
    clip = _target("vit", "timm/test_vit@none", 4)
    assert lane_device(frames, CUDA) == torch.device("cpu") and frames.encoder.device.type == "cpu"
    assert lane_device(clip, CUDA) == CUDA
    assert lane_device(frames, torch.device("cpu")) == torch.device("cpu")


def test_decode_workers_follow_the_cores_and_the_device(monkeypatch):
    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert pipeline.default_num_workers(torch.device("cpu")) == pipeline.CPU_DEVICE_MAX_WORKERS == 8
    assert pipeline.default_num_workers(CUDA) == 15  # every spare core decodes for an accelerator
    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: {0})
    assert pipeline.default_num_workers(CUDA) == pipeline.default_num_workers(torch.device("cpu")) == 1


def test_decoding_in_threads_gives_the_batches_of_decoding_in_this_thread(tmp_path):
    """What a Dask task does (no worker processes): decode batches in a thread pool while encoding."""
    paths = [str(write_mp4(tmp_path / f"{i}.mp4", 1.0, seed=i, size=(32, 48))) for i in range(5)]
    job = make_job(0, "e", "frames@2", create_encoder("timm/test_vit@none").preprocessor(), 2)
    decoder = ClipDecoder({"frames@2": Source("frames", 2)}, [job], {r: (0,) for r in range(5)}, [""] * 5, paths)
    batches = [[0, 1], [2, 3], [4]]
    threaded = list(pipeline.decode_in_threads(decoder, batches, threads=2))
    for rows, got in zip(batches, threaded):
        expected = collate([decoder[r] for r in rows])
        np.testing.assert_array_equal(got.rows, expected.rows)
        assert torch.equal(got.inputs[0][1], expected.inputs[0][1])


def test_the_default_batch_is_larger_on_an_accelerator_and_sized_in_frames():
    from featurestore.extract.run import ACCELERATOR_BATCH_FRAMES, CPU_BATCH_CLIPS, default_batch_size

    assert default_batch_size(torch.device("cpu"), 12) == CPU_BATCH_CLIPS == 16
    assert default_batch_size(CUDA, 12) * 12 == ACCELERATOR_BATCH_FRAMES == 768  # 64 clips of 12 frames
    assert default_batch_size(CUDA, 5) == 153 and default_batch_size(CUDA, 100) == CPU_BATCH_CLIPS


def test_several_writer_threads_store_what_one_writer_stores(tmp_path, monkeypatch):
    """Writers each owning every n-th block (what an accelerator run uses), here on the CPU: 3
    writers, blocks of 2 clips, chunks written and partly committed: the same stored bits."""
    from tests.featurestore.test_extract_support import FAST, make_dataset, read_all

    from featurestore.extract import extract

    tiny = make_dataset(tmp_path / "data", 6)
    extract(tiny, tmp_path / "one.zarr", "logmel", **FAST)
    counts = []
    monkeypatch.setattr(pipeline, "default_writers", lambda store, device: counts.append(3) or 3)
    extract(tiny, tmp_path / "three.zarr", "logmel", commit_seconds=1e-6, **FAST)
    one, three = read_all(tmp_path / "one.zarr")["logmel"], read_all(tmp_path / "three.zarr")["logmel"]
    assert counts == [3] and three[1].all()
    np.testing.assert_array_equal(three[0], one[0])
