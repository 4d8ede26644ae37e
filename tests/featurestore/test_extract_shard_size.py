"""An extraction's feature sets get the store's shards of ~32 MiB (docs/store.md), not 4,096 clips.

Small clips (one 512-d float16 vector, 1 KiB) were held to shards of 4,096 clips (4 MiB) by the
block bound; now a shard is ~32 MiB of clips up to ``MAX_BLOCK_CLIPS``, while a store keeps at least
``MIN_BLOCKS`` blocks (Dask tasks) down to shards of ``MIN_SPLIT_BYTES``.
"""
from __future__ import annotations

import pytest

from featurestore.extract.plan import MAX_BLOCK_CLIPS, MIN_BLOCKS, MIN_SPLIT_BYTES, extraction_chunk_clips
from featurestore.store.layout import TARGET_CHUNK_BYTES


@pytest.mark.parametrize("n_clips, clips", [
    (12_291, 4096),  # a small store: 4,096-clip blocks, as before (3 of them)
    (1_000_000, 8192),  # 1/64 of the store (15,625) as a power of two: 123 blocks of 8 MiB
    (10_000_000, 32768),  # 32 MiB: the store's shard size
])
def test_one_kib_clips_get_shards_of_the_store_size_kept_to_at_least_64_blocks(n_clips, clips):
    got = extraction_chunk_clips(1, (512,), "float16", n_clips)
    assert got == clips
    assert got * 1024 <= TARGET_CHUNK_BYTES and (got <= n_clips // MIN_BLOCKS or got * 1024 == MIN_SPLIT_BYTES)


def test_tiny_clips_stop_at_the_block_bound():
    assert extraction_chunk_clips(1, (16,), "float16", 10**8) == MAX_BLOCK_CLIPS  # 32 B a clip


@pytest.mark.parametrize("n_segments, shape, dtype, clips", [
    (12, (512,), "float16", 256),  # clip/ViT-B-32: 3 MiB shards (32 MiB would leave TAU 7 blocks)
    (12, (1624,), "float16", 128),  # timm/regnetx_064: 4.8 MiB
])
def test_tau_sized_stores_keep_64_blocks_with_shards_down_to_4_mib(n_segments, shape, dtype, clips):
    """12,291 clips: 1/64 is 192 clips; the common block of 256 clips gives 49 blocks."""
    assert extraction_chunk_clips(n_segments, shape, dtype, 12_291) == clips
    assert extraction_chunk_clips(n_segments, shape, dtype, 10**7) > clips  # big stores: bigger shards


def test_large_clips_get_32_mib_shards_at_any_store_size():
    for n_clips in (12_291, 10**7):  # log-mel, 470 KiB a clip: 64 clips, 29 MiB
        assert extraction_chunk_clips(10, (256, 94), "float16", n_clips) == 64
