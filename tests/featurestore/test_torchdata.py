"""The store -> torch data path: exact values, alignment of feature sets, block reads, shuffling, streaming."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from featurestore.errors import MissingFeatureError, UnknownFeatureError
from featurestore import ClipRecord, Manifest
from featurestore.store import create_store, open_store
from featurestore.torchdata import Batch, StoreDataset, TensorBatches, WorkerLoader

N_CLIPS, SEGMENTS, CHUNK = 40, 3, 8
CLASSES = ["a", "b", "c"]


def _value(rows: np.ndarray, segments: np.ndarray, feature: int) -> np.ndarray:
    """What the store holds at (row, segment) of feature set ``feature``: decodable, exact in float16."""
    return rows * 10 + segments + feature * 1000


def _build(path: Path) -> Path:
    clips = [ClipRecord(f"{CLASSES[i % 3]}-x-{i}", label=CLASSES[i % 3] if i != 39 else None,
                        splits=frozenset({"train" if i < 30 else "test"})) for i in range(N_CLIPS)]
    store = create_store(path, Manifest("t", CLASSES, clips))
    rows = np.arange(N_CLIPS)[:, None]
    segs = np.arange(SEGMENTS)[None, :]
    for f, (name, dim) in enumerate([("emb/a", 4), ("emb/b", 2)]):
        store.create_feature_set(name, SEGMENTS, (dim,), {"encoder": name, "weights": {"kind": "random", "seed": 0}},
                                 chunk_clips=CHUNK)
        data = np.repeat(_value(rows, segs, f)[..., None], dim, axis=2).astype(np.float16)
        store.write_rows(name, 0, data)
    store.create_feature_set("emb/partial", SEGMENTS, (2,), {"encoder": "p"}, chunk_clips=CHUNK)
    store.write_rows("emb/partial", 0, np.zeros((CHUNK, SEGMENTS, 2), dtype=np.float16))
    store.close()
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    s = open_store(_build(tmp_path_factory.mktemp("td") / "s.zarr"), mode="r")
    yield s
    s.close()


def _collect(ds) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    batches = list(ds)
    inputs = [torch.cat([b.inputs[i] for b in batches]).numpy() for i in range(len(batches[0].inputs))]
    return inputs, *(torch.cat([getattr(b, k) for b in batches]).numpy() for k in ("labels", "rows", "segments"))


def test_segment_level_values_are_exact_and_aligned_across_feature_sets(store):
    ds = StoreDataset(store, ["emb/a", "emb/b"], split="train", batch_size=7, shuffle=True, seed=3)
    (a, b), labels, rows, segs = _collect(ds)
    assert a.dtype == np.float32 and a.shape == (30 * SEGMENTS, 4) and b.shape == (30 * SEGMENTS, 2)
    assert np.array_equal(a[:, 0], _value(rows, segs, 0)) and np.array_equal(b[:, 1], _value(rows, segs, 1))
    assert sorted(zip(rows.tolist(), segs.tolist())) == [(r, s) for r in range(30) for s in range(SEGMENTS)]
    assert np.array_equal(labels, rows % 3)
    assert len(ds) == len(list(ds)) == int(np.ceil(90 / 7))


def test_clip_level_returns_all_segments_of_a_clip(store):
    ds = StoreDataset(store, ["emb/a", "emb/b"], split="test", level="clip", batch_size=4)
    (a, b), labels, rows, segs = _collect(ds)
    assert a.shape == (10, SEGMENTS, 4) and b.shape == (10, SEGMENTS, 2)
    assert list(rows) == list(range(30, 40)) and (segs == -1).all()
    assert np.array_equal(a[:, :, 0], _value(rows[:, None], np.arange(SEGMENTS)[None], 0))
    assert labels[-1] == -1  # clip 39 has no label


def test_shuffle_is_seeded_per_epoch(store):
    def order(seed: int, epoch: int) -> list[int]:
        ds = StoreDataset(store, "emb/a", split="train", batch_size=16, shuffle=True, seed=seed, shuffle_buffer=16)
        ds.set_epoch(epoch)
        return (_collect(ds)[2] * 10 + _collect(ds)[3]).tolist()

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2)
    assert order(0, 1) != order(1, 1)
    assert order(0, 1) != sorted(order(0, 1))


def test_reads_whole_blocks_through_read_rows(store, monkeypatch):
    calls: list[tuple[str, int, int]] = []
    original = store.read_rows

    def spy(name, start, stop, check_done=True):
        calls.append((name, start, stop))
        return original(name, start, stop, check_done=check_done)

    monkeypatch.setattr(store, "read_rows", spy)
    list(StoreDataset(store, ["emb/a", "emb/b"], batch_size=10, shuffle=True))
    assert len(calls) == 2 * (N_CLIPS // CHUNK)  # one read per chunk and feature set, never per row
    assert all(stop - start == CHUNK and start % CHUNK == 0 for _, start, stop in calls)


def test_streams_lazily_one_read_group_ahead(store, monkeypatch):
    calls: list[int] = []
    original = store.read_rows
    monkeypatch.setattr(store, "read_rows", lambda n, a, b, check_done=True: calls.append(a) or original(n, a, b, check_done))
    ds = StoreDataset(store, "emb/a", batch_size=4, shuffle=True, shuffle_buffer=CHUNK)
    it = iter(ds)
    next(it)
    import time

    time.sleep(0.2)  # let the prefetch thread run as far as it may
    # the read group being consumed and the next one, read ahead: never more, whatever the epoch's length
    assert len(calls) == 2 < N_CLIPS // CHUNK
    batches_per_group = CHUNK * SEGMENTS // 4  # level="segment": one sample per (clip, segment)
    for _ in range(batches_per_group):  # into the second read group: the third may now be read
        next(it)
    time.sleep(0.2)
    assert len(calls) == 3
    it.close()


def test_cache_gives_the_same_batches_as_streaming(store):
    kw = dict(split="train", batch_size=8, shuffle=True, seed=5)
    streamed = _collect(StoreDataset(store, ["emb/a", "emb/b"], **kw))
    cached_ds = StoreDataset(store, ["emb/a", "emb/b"], cache=True, **kw)
    for _ in range(2):  # the second epoch reads the cache only
        cached = _collect(cached_ds)
        for x, y in zip(streamed[0] + list(streamed[1:]), cached[0] + list(cached[1:])):
            assert np.array_equal(x, y)


def test_missing_features_are_refused_or_skipped(store):
    with pytest.raises(MissingFeatureError, match="emb/partial"):
        StoreDataset(store, ["emb/a", "emb/partial"])
    ds = StoreDataset(store, ["emb/a", "emb/partial"], missing="skip", level="clip", batch_size=100)
    assert ds.n_skipped == N_CLIPS - CHUNK
    assert _collect(ds)[2].tolist() == list(range(CHUNK))


def test_unknown_feature_set_is_refused_naming_the_stored_ones(store):
    with pytest.raises(UnknownFeatureError, match="emb/nope.*emb/a"):
        StoreDataset(store, ["emb/a", "emb/nope"])


def test_unlabelled_clips_are_refused_when_labels_are_required(store):
    with pytest.raises(ValueError, match="no label"):
        StoreDataset(store, "emb/a", split="test", require_labels=True)


def test_single_samples_work_with_a_plain_dataloader(store):
    ds = StoreDataset(store, ["emb/a", "emb/b"], split="test")
    batch = next(iter(DataLoader(ds, batch_size=5)))
    inputs, labels, rows, segs = batch
    assert inputs[0].shape == (5, 4) and inputs[1].shape == (5, 2) and labels.shape == (5,)
    assert torch.equal(inputs[0][:, 0], torch.as_tensor(_value(rows.numpy(), segs.numpy(), 0), dtype=torch.float32))


def test_worker_processes_cover_every_sample_once(tmp_path):
    path = _build(tmp_path / "w.zarr")
    ds = StoreDataset(str(path), "emb/a", batch_size=6, shuffle=True, shuffle_buffer=CHUNK)
    batches = list(WorkerLoader(ds, num_workers=2))
    pairs = sorted((int(r), int(s)) for b in batches for r, s in zip(b.rows, b.segments))
    assert pairs == [(r, s) for r in range(N_CLIPS) for s in range(SEGMENTS)]
    assert all(isinstance(b, Batch) for b in batches)


def test_persistent_workers_follow_set_epoch(tmp_path):
    """The workers outlive an epoch (one DataLoader, reused) and still read each epoch's own shuffle:
    epoch 2 through the kept workers is what a fresh loader set to epoch 2 reads."""
    path = _build(tmp_path / "w.zarr")
    make = lambda: StoreDataset(str(path), "emb/a", batch_size=6, shuffle=True, shuffle_buffer=CHUNK)  # noqa: E731
    loader = WorkerLoader(make(), num_workers=2)
    order = lambda batches: [int(r) * 10 + int(s) for b in batches for r, s in zip(b.rows, b.segments)]  # noqa: E731
    loader.set_epoch(1)
    first = order(loader)
    kept = loader._loader
    loader.set_epoch(2)
    second = order(loader)
    fresh = WorkerLoader(make(), num_workers=2)
    fresh.set_epoch(2)
    assert loader._loader is kept and second != first and second == order(fresh)
    loader.close()
    fresh.close()


def test_keep_dtype_hands_over_the_stored_dtype_and_to_converts_it(store):
    kept = next(iter(StoreDataset(store, ["emb/a", "emb/b"], batch_size=7, keep_dtype=True)))
    floats = next(iter(StoreDataset(store, ["emb/a", "emb/b"], batch_size=7)))
    assert [x.dtype for x in kept.inputs] == [torch.float16] * 2 and floats.inputs[0].dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(kept.to("cpu").inputs, floats.inputs))


def test_pin_memory_cuts_every_batch_input_into_pinned_memory(store, monkeypatch):
    """Every input and the labels of every batch, a batch joined across read groups too, are allocated
    pinned (no GPU here: the allocation is recorded and made unpinned); the values are those of an
    unpinned loader."""
    real_empty, pinned = torch.empty, []

    def empty(*shape, pin_memory=False, **kwargs):
        pinned.append(pin_memory)
        return real_empty(*shape, **kwargs)

    reference = _collect(StoreDataset(store, ["emb/a", "emb/b"], batch_size=7, shuffle=True, shuffle_buffer=CHUNK,
                                      keep_dtype=True))
    monkeypatch.setattr(torch, "empty", empty)
    pinned_run = _collect(StoreDataset(store, ["emb/a", "emb/b"], batch_size=7, shuffle=True, shuffle_buffer=CHUNK,
                                       keep_dtype=True, pin_memory=True))
    n_batches = -(-N_CLIPS * SEGMENTS // 7)  # both inputs and the labels of each, and of batches joined
    assert all(pinned) and len(pinned) >= 3 * n_batches
    assert all(np.array_equal(a, b) for a, b in zip(reference[0], pinned_run[0]))
    assert all(np.array_equal(a, b) for a, b in zip(reference[1:], pinned_run[1:]))


def test_segment_level_needs_equal_segment_counts(tmp_path):
    s = create_store(tmp_path / "x.zarr", Manifest("t", CLASSES, [ClipRecord("a-1", label="a")]))
    s.create_feature_set("f3", 3, (2,), {"encoder": "f3"})
    s.create_feature_set("f5", 5, (2,), {"encoder": "f5"})
    s.write_rows("f3", 0, np.zeros((1, 3, 2)))
    s.write_rows("f5", 0, np.zeros((1, 5, 2)))
    with pytest.raises(ValueError, match="same number of segments"):
        StoreDataset(s, ["f3", "f5"])
    assert StoreDataset(s, ["f3", "f5"], level="clip").n_samples == 1
    s.close()


def test_tensor_batches_shuffle_like_the_store_loader():
    x = torch.arange(20.0).view(10, 2)
    tb = TensorBatches([x], torch.arange(10) % 3, batch_size=4, shuffle=True, seed=1)
    tb.set_epoch(1)
    first = torch.cat([b.rows for b in tb])
    tb.set_epoch(2)
    assert sorted(first.tolist()) == list(range(10)) and first.tolist() != torch.cat([b.rows for b in tb]).tolist()
    assert len(tb) == 3


def test_store_method_builds_the_same_dataset(store):
    direct = _collect(StoreDataset(store, ["emb/a"], split="train", batch_size=5))
    via_method = _collect(store.torch_dataset("emb/a", split="train", batch_size=5))
    assert all(np.array_equal(x, y) for x, y in zip(direct[0], via_method[0]))
    assert np.array_equal(direct[2], via_method[2])
