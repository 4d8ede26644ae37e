"""Feature sets get the store's shards of ~32 MiB (docs/store.md), not 4,096 clips, whoever creates them.

Small clips (one 512-d float16 vector, 1 KiB) were held to shards of 4,096 clips (4 MiB) by the
block bound; now a shard is ~32 MiB of clips up to ``MAX_CHUNK_CLIPS``, while a store keeps at least
``MIN_BLOCKS`` blocks (Dask tasks) down to shards of ``MIN_SPLIT_BYTES``. One function decides
(``layout.default_chunk_clips``): extraction, ``create_feature_set`` and ``create_predictions``.
"""
from __future__ import annotations

import numpy as np
import pytest

from featurestore import ClipRecord, Manifest, create_store
from featurestore.store.layout import (MAX_CHUNK_CLIPS, MIN_BLOCKS, MIN_SPLIT_BYTES, TARGET_CHUNK_BYTES,
                                       default_chunk_clips)
from featurestore.store.row_group import PREDICTION_RUNS


@pytest.mark.parametrize("n_clips, clips", [
    (12_291, 4096),  # a small store: 4,096-clip blocks, as before (3 of them)
    (1_000_000, 8192),  # 1/64 of the store (15,625) as a power of two: 123 blocks of 8 MiB
    (10_000_000, 32768),  # 32 MiB: the store's shard size
])
def test_one_kib_clips_get_shards_of_the_store_size_kept_to_at_least_64_blocks(n_clips, clips):
    got = default_chunk_clips(1, (512,), "float16", n_clips)
    assert got == clips
    assert got * 1024 <= TARGET_CHUNK_BYTES and (got <= n_clips // MIN_BLOCKS or got * 1024 == MIN_SPLIT_BYTES)


def test_tiny_clips_stop_at_the_block_bound():
    assert default_chunk_clips(1, (16,), "float16", 10**8) == MAX_CHUNK_CLIPS  # 32 B a clip


@pytest.mark.parametrize("n_segments, shape, dtype, clips", [
    (12, (512,), "float16", 256),  # clip/ViT-B-32: 3 MiB shards (32 MiB would leave TAU 7 blocks)
    (12, (1624,), "float16", 128),  # timm/regnetx_064: 4.8 MiB
])
def test_tau_sized_stores_keep_64_blocks_with_shards_down_to_4_mib(n_segments, shape, dtype, clips):
    """12,291 clips: 1/64 is 192 clips; the common block of 256 clips gives 49 blocks."""
    assert default_chunk_clips(n_segments, shape, dtype, 12_291) == clips
    assert default_chunk_clips(n_segments, shape, dtype, 10**7) > clips  # big stores: bigger shards


def test_large_clips_get_32_mib_shards_at_any_store_size():
    for n_clips in (12_291, 10**7):  # log-mel, 470 KiB a clip: 64 clips, 29 MiB
        assert default_chunk_clips(10, (256, 94), "float16", n_clips) == 64


def test_the_public_api_takes_the_same_rule_as_extraction(tmp_path):
    """``create_feature_set`` and ``create_predictions`` without ``chunk_clips`` (they capped at 4,096)."""
    manifest = Manifest("shards", ["a", "b"], [ClipRecord(f"c{i}", label="a") for i in range(300)])
    prov = {"encoder": "x", "config": {}, "weights": {"kind": "random", "seed": 0}, "segments": {}}
    with create_store(tmp_path / "s.zarr", manifest) as store:
        small = store.create_feature_set("small", 1, (16,), prov)  # 32 B a clip
        wide = store.create_feature_set("wide", 1, (512,), prov)  # 1 KiB a clip
        big = store.create_feature_set("big", 10, (256, 94), prov)  # log-mel, 470 KiB a clip
        store.create_predictions("run", 1, {"head": "linear"})
        assert small.chunk_clips == default_chunk_clips(1, (16,), "float16", 300) == MAX_CHUNK_CLIPS
        assert wide.chunk_clips == default_chunk_clips(1, (512,), "float16", 300) == 4096
        assert big.chunk_clips == 8  # a 300-clip store: 64 blocks would be below 4 MiB shards
        assert store.row_group(PREDICTION_RUNS, "run").chunk_rows == default_chunk_clips(1, (2,), "float32", 300)
        store.write_rows("small", 0, np.ones((300, 1, 16), dtype=np.float16))  # one whole (edge) chunk
        assert store.get("small", "c299").shape == (1, 16)
