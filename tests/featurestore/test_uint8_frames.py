"""uint8 frames all the way to the encoder's device (issue 21 item 1).

Decode workers hand over the decoded frames (``uint8``, ``H x W x 3`` bytes per frame through shared
memory) and the encode lane resizes, crops and normalises each encode batch where the encoder runs.
On the CPU that batched path must give the per-frame preprocessing's output bit for bit, or stored
features (and fingerprints, which promise them) would change: the per-frame implementation this
replaced is kept frozen as the reference (``featurestore.testing.per_frame_preprocessing``, which
scripts/bench/bench_preprocess.py times too).
"""
from __future__ import annotations

import functools
import gc
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.featurestore.test_extract_support import FAST, make_dataset, read_all, write_mp4

import featurestore.encoders._preprocess as preprocess_module
from featurestore.decode import sample_frames
from featurestore.encoders import FramePreprocessor, create_encoder
from featurestore.encoders.clip import clip_frame_preprocessor
from featurestore.encoders.timm_frames import frame_preprocessor
from featurestore.extract import extract
from featurestore.extract.plan import Source
from featurestore.extract import pipeline, workers
from featurestore.extract.buffer_pool import BufferPool
from featurestore.extract.workers import ClipDecoder, collate, make_job, preprocess_on_device
from featurestore.testing import per_frame_preprocessing

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

#: The preprocessing configurations of the image families, built by the families' own translators.
PREPROCESSORS = {
    "clip ViT-B-32 (224, bicubic, shortest side)": clip_frame_preprocessor(
        {"size": 224, "mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic", "resize_mode": "shortest"}),
    "clip RN50x4 (288)": clip_frame_preprocessor(
        {"size": 288, "mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic"}),
    "clip squash 40x40": clip_frame_preprocessor(
        {"size": (40, 40), "mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bilinear", "resize_mode": "squash"}),
    "timm 224 crop_pct 0.875 bilinear": frame_preprocessor(
        {"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bilinear", "mean": IMAGENET_MEAN,
         "std": IMAGENET_STD}),
    "timm 32 crop_pct 0.95 bicubic": frame_preprocessor(
        {"input_size": (3, 32, 32), "crop_pct": 0.95, "interpolation": "bicubic", "mean": IMAGENET_MEAN,
         "std": IMAGENET_STD}),
    "timm squash 48x48": frame_preprocessor(
        {"input_size": (3, 48, 48), "crop_pct": 1.0, "crop_mode": "squash", "interpolation": "bicubic",
         "mean": IMAGENET_MEAN, "std": IMAGENET_STD}),
    "nearest 24": FramePreprocessor(crop=(24, 24), resize=24, interpolation="nearest", mean=(0.5,) * 3,
                                    std=(0.25,) * 3),
}


@pytest.fixture(scope="module")
def decoded(tmp_path_factory) -> dict[str, np.ndarray]:
    """Real decoded frames (MPEG-4, yuv420p: even sizes) of several sizes and aspect ratios, plus
    odd-sized frames cut from them (no yuv420p codec writes odd sizes)."""
    root = tmp_path_factory.mktemp("sizes")
    frames = {}
    for h, w in [(48, 64), (64, 48), (90, 160), (226, 402)]:
        path = write_mp4(root / f"{h}x{w}.mp4", 1.0, seed=h * w, fps=2, size=(h, w))
        frames[f"{h}x{w}"] = sample_frames(path, 2)
    big = frames["226x402"]
    frames["odd 37x53"] = np.ascontiguousarray(big[:, 11:48, 5:58])
    frames["odd 201x199"] = np.ascontiguousarray(big[:, 3:204, 100:299])
    frames["odd 5x7"] = np.ascontiguousarray(big[:, 7:12, 0:7])
    return frames


@pytest.mark.parametrize("name", list(PREPROCESSORS))
def test_batched_preprocessing_equals_the_per_frame_one_bit_for_bit(name, decoded, monkeypatch):
    pre = PREPROCESSORS[name]
    for size, frames in decoded.items():
        expected = per_frame_preprocessing(pre, frames)
        stack = torch.from_numpy(np.concatenate([frames, frames[::-1]]))
        for slice_bytes in (1, 1 << 40):  # one frame per op, and the whole stack in one op (the GPU's way)
            monkeypatch.setattr(preprocess_module, "CPU_SLICE_BYTES", slice_bytes)
            got = pre.batched(stack)
            np.testing.assert_array_equal(got[:len(frames)].numpy(), expected.numpy(), err_msg=f"{name}, {size}")
            np.testing.assert_array_equal(got[len(frames):].numpy(), expected.numpy()[::-1], err_msg=f"{name}, {size}")
        np.testing.assert_array_equal(pre(frames).numpy(), expected.numpy())


def test_batched_preprocessing_refuses_anything_but_uint8_frames():
    pre = PREPROCESSORS["nearest 24"]
    with pytest.raises(ValueError, match=r"expected a uint8 RGB frame tensor \[N, H, W, 3\], got torch.float32"):
        pre.batched(torch.zeros((2, 8, 8, 3)))
    with pytest.raises(ValueError, match=r"expected uint8 RGB frames \[K, H, W, 3\], got float32"):
        pre(np.zeros((2, 8, 8, 3), np.float32))


def _frame_jobs():
    """Three image encoders' jobs on one frame source, as extraction builds them."""
    return [make_job(i, f"e{i}", "frames@2", pre, 2)
            for i, pre in enumerate([PREPROCESSORS["clip squash 40x40"], PREPROCESSORS["timm 32 crop_pct 0.95 bicubic"],
                                     PREPROCESSORS["nearest 24"]])]


def test_decode_workers_hand_over_uint8_frames_through_shared_memory(tmp_path):
    paths = [str(write_mp4(tmp_path / f"{i}.mp4", 2.0, seed=i, size=(48, 64))) for i in range(3)]
    decoder = ClipDecoder({"frames@2": Source("frames", 2)}, _frame_jobs(), {r: (0, 1, 2) for r in range(3)},
                          [""] * 3, paths)
    loader = torch.utils.data.DataLoader(decoder, batch_sampler=[[0, 1, 2]], collate_fn=collate, num_workers=1,
                                         timeout=60)
    gc.collect()  # as run_blocks does: no PyAV object of an earlier test is collected in the forked worker
    (batch,) = list(loader)
    rows, x = batch.inputs[0]
    np.testing.assert_array_equal(rows, [0, 1, 2])
    assert x.dtype == torch.uint8 and tuple(x.shape) == (6, 48, 64, 3) and x.is_shared()
    assert x.numel() * x.element_size() // x.shape[0] == 48 * 64 * 3  # bytes per frame through shared memory
    assert batch.inputs[1][1] is x and batch.inputs[2][1] is x  # one tensor for every image encoder
    np.testing.assert_array_equal(x[2:4].numpy(), sample_frames(paths[1], 2))


def test_decode_workers_reuse_their_shared_buffers_and_never_overwrite_a_batch_still_held(tmp_path):
    """12 decode batches through one worker with 3 pool slots: every batch arrives in a reused buffer
    (none falls back to fresh shared memory), the main process maps at most 3 buffers, and a batch it
    keeps holding is never written over."""
    paths = [str(write_mp4(tmp_path / f"{i}.mp4", 2.0, seed=i, size=(48, 64))) for i in range(4)]
    decoder = ClipDecoder({"frames@2": Source("frames", 2)}, _frame_jobs(), {r: (0, 1, 2) for r in range(4)},
                          [""] * 4, paths)
    pool = BufferPool(1, slots_per_worker=3)
    loader = torch.utils.data.DataLoader(decoder, batch_sampler=[[r % 4] for r in range(12)], num_workers=1,
                                         collate_fn=functools.partial(collate, pool=pool), prefetch_factor=1,
                                         timeout=60)
    held, buffers, got = None, set(), []
    gc.collect()  # as run_blocks does: no PyAV object of an earlier test is collected in the forked worker
    batches = iter(loader)
    for k in range(12):  # not enumerate(loader): its cached result tuple would hold the last batch
        batch = next(batches)
        (row,), x = batch.inputs[0]
        assert x.numel() * x.element_size() // x.shape[0] == 48 * 64 * 3 and x.is_shared()
        buffers.add(x.untyped_storage().data_ptr())  # a buffer mapped again would sit elsewhere
        got.append((row, x.clone()))
        if k == 0:
            held = (x, x.clone())  # slot kept busy to the end
        del batch, x  # let go before asking for the next batch
    expected = [sample_frames(p, 2) for p in paths]  # decoded after the worker is gone (PyAV and fork)
    for row, x in got:
        np.testing.assert_array_equal(x.numpy(), expected[row])
    assert pool.received_tensors == 12 and len(buffers) <= 3
    assert torch.equal(*held) and int(pool.busy.sum()) == 1
    pool.close()


def test_clips_of_several_frame_sizes_in_one_decode_batch_are_stacked_per_size(tmp_path):
    sizes = [(48, 64), (64, 48), (48, 64)]
    paths = [str(write_mp4(tmp_path / f"{i}.mp4", 2.0, seed=i, size=s)) for i, s in enumerate(sizes)]
    decoder = ClipDecoder({"frames@2": Source("frames", 2)}, _frame_jobs(), {r: (0, 1, 2) for r in range(3)},
                          [""] * 3, paths)
    batch = collate([decoder[r] for r in range(3)])
    groups = batch.groups(0)
    assert [(list(rows), tuple(x.shape)) for rows, x in groups] == [([0, 2], (4, 48, 64, 3)), ([1], (2, 64, 48, 3))]


def test_extraction_preprocesses_on_the_device_unless_it_is_the_cpu(monkeypatch):
    assert preprocess_on_device(torch.device("cuda")) and preprocess_on_device(torch.device("mps"))
    assert not preprocess_on_device(torch.device("cpu"))
    monkeypatch.setattr(workers, "PREPROCESS_ON_DEVICE", True)
    assert preprocess_on_device(torch.device("cpu"))
    job = make_job(0, "e", "frames@2", PREPROCESSORS["nearest 24"], 2, on_device=False)
    assert job.batched is None and job.preprocess is PREPROCESSORS["nearest 24"]


def test_extraction_stores_the_per_frame_preprocessings_features_exactly(tmp_path, monkeypatch):
    """The device path run on the CPU, through a worker process and shared memory, with clips of two
    frame sizes in one decode batch and in one encode batch."""
    monkeypatch.setattr(workers, "PREPROCESS_ON_DEVICE", True)
    handed_over = []
    lane_init = pipeline._Lane.__init__

    def spy(self, *args, **kwargs):
        lane_init(self, *args, **kwargs)
        handed_over.append(self.batched is not None)

    monkeypatch.setattr(pipeline._Lane, "__init__", spy)
    tiny = make_dataset(tmp_path / "data", 2)
    write_mp4(tiny.root / tiny.clips[1].video, 2.0, seed=11, size=(64, 48))  # portrait, another size
    specs = ["timm/test_vit@none", "clip/ViT-S-32-alt@none"]
    path = tmp_path / "s.zarr"
    extract(tiny, path, specs, **FAST)  # one decode worker, encode batches of 2 rows: rows 0 and 1 differ in size
    assert handed_over == [True, True]  # both lanes preprocessed uint8 frames themselves
    stored = read_all(path)
    for spec in specs:
        enc = create_encoder(spec)
        data, done = stored[enc.name]
        assert done.all()
        # the run's one encode batch (rows 0 and 1; the model's output depends on the batch's shape)
        frames = [sample_frames(Path(tiny.root) / clip.video, 2) for clip in tiny.clips]
        x = torch.cat([per_frame_preprocessing(enc.preprocessor(), f) for f in frames])
        expected = enc.encode(x).numpy().astype(np.float16).reshape(2, 2, -1)
        np.testing.assert_array_equal(data, expected, err_msg=spec)
