"""Ids resolved a few at a time are kept: asking them again neither hashes them through the lookup
again nor counts towards decoding the whole id column (issue 23: a warm ``get`` at a million clips
spent half its time in the lookup, and a loop over a handful of clips decoded every id after
``n / 16`` asks). Real stores built through the public API; reads are counted on the store itself.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from featurestore import ClipRecord, Manifest, create_store, open_store

N, FEAT = 2000, "emb/test"


def _build(path) -> np.ndarray:
    data = np.arange(N, dtype=np.float16)[:, None, None].repeat(4, axis=2)
    with create_store(path, Manifest("recent", ["a"], [ClipRecord(f"clip-{i:05d}", label="a") for i in range(N)])) as s:
        s.create_feature_set(FEAT, 1, (4,), {"encoder": "emb/test", "config": {}, "weights": {"kind": "random"}})
        s.write_rows(FEAT, 0, data)
    return data


def test_getting_the_same_few_clips_again_and_again_never_decodes_the_id_column(tmp_path):
    data = _build(tmp_path / "s.zarr")
    with open_store(tmp_path / "s.zarr") as store:
        reads: Counter = Counter()
        read = store.arrays.read

        def counted(path, start, stop, **kwargs):
            reads[path] += stop - start
            return read(path, start, stop, **kwargs)

        store.arrays.read = counted
        ids = ["clip-00007", "clip-01234", "clip-01999"]
        for _ in range(200):  # 600 single asks, far past N / 16 = 125
            for cid in ids:
                assert np.array_equal(store.get(FEAT, cid), data[int(cid[5:])])
        assert reads["index/clip_id"] == 0, reads
        assert store.rows(["clip-01999", "clip-00007"]).tolist() == [1999, 7]
        assert store.index.find(["clip-00000", "no-such-clip"]).tolist() == [0, -1]
        assert store.index.find(["no-such-clip"]).tolist() == [-1]  # a miss is never kept as a hit
