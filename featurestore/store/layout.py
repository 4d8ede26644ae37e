"""What a store is on disk before any clip: its groups, schema version, names and chunk sizes.

``FeatureStore`` creates and checks the layout through these on open; feature sets and prediction
runs size their chunks with :func:`default_chunk_clips` and :func:`default_inner_clips` (an extraction's
sets take the first too, ``convert`` rewrites old stores with the second).
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from featurestore.errors import StoreFormatError
from featurestore.store._backend import STRING
from featurestore.store.arrays import StoreArrays

# 2: every written chunk is stored (a missing one is damage) and ``n_clips`` in the root attributes
# is the commit point of an append. Version 1 stores are read as before (missing chunks = fill).
SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
TARGET_CHUNK_BYTES = 32 * 2**20  # a shard: see default_chunk_clips and docs/store.md (benchmark)
#: Most clips in a chunk (a shard), and in a block an extraction writes: a commit rewrites a chunk's
#: done flags and error texts whole, and a block is the least work a Dask task owns.
MAX_CHUNK_CLIPS = 65536
#: A store's chunks are small enough that it splits into at least this many (Dask tasks for 16
#: workers at ``extract.dask.TASKS_PER_THREAD``), but not below ``MIN_SPLIT_BYTES`` (where an object
#: store's cost per object stops mattering, docs/scaling.md).
MIN_BLOCKS = 64
MIN_SPLIT_BYTES = 4 * 2**20
TARGET_INNER_BYTES = 8 * 2**10  # an inner chunk: see default_inner_clips and docs/store.md (benchmark)
INDEX_CHUNK_ROWS = 65536
_NAME_RE = re.compile(r"^[A-Za-z0-9_.+@=-]+(/[A-Za-z0-9_.+@=-]+)*$")
_INDEX_STRINGS = ("clip_id", "city", "location", "audio_path", "video_path")


def default_chunk_clips(n_segments: int, feature_shape: Sequence[int], dtype: str, n_clips: int) -> int:
    """Clips per chunk (a shard) of a new feature set or prediction run of a store of ``n_clips``:
    the one rule for every writer (``create_feature_set``, extraction, predictions).

    About ``TARGET_CHUNK_BYTES`` (32 MiB) of clips, at most ``MAX_CHUNK_CLIPS``; but no more than
    1/``MIN_BLOCKS`` of the store unless that is below ``MIN_SPLIT_BYTES``, so that a Dask run has
    tasks for its workers (a block is whole chunks, a task whole blocks). A power of two, so chunk
    sizes of different sets divide each other (their common block is the largest). The chunk is
    what a writer writes whole; reads decode its inner chunks (:func:`default_inner_clips`), so
    its size does not cost random reads, and big shards keep a store of millions of clips to a
    few hundred files. See docs/store.md and docs/scaling.md for the measurements and the sizes.
    """
    per_clip = max(1, n_segments * int(np.prod(feature_shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
    by_tasks = max(int(n_clips) // MIN_BLOCKS, MIN_SPLIT_BYTES // per_clip)
    clips = max(1, min(MAX_CHUNK_CLIPS, TARGET_CHUNK_BYTES // per_clip, by_tasks))
    return 1 << (clips.bit_length() - 1)


def default_inner_clips(n_segments: int, feature_shape: Sequence[int], dtype: str, chunk_clips: int) -> int:
    """Clips per inner chunk: the largest divisor of ``chunk_clips`` of at most ~8 KiB (at least 1).

    A random read decodes whole inner chunks, so their size bounds the bytes decoded per clip
    returned (8x at 1 KiB per clip: the scale floor is 16x); below a few KiB the index and the
    per-chunk checksum start to cost more than the bytes. Equal to ``chunk_clips`` (no sharding)
    where one chunk is that small already. See docs/store.md for the measurement.
    """
    per_clip = n_segments * int(np.prod(feature_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    target = max(1, min(int(chunk_clips), TARGET_INNER_BYTES // max(1, per_clip)))
    return max(d for d in range(1, target + 1) if chunk_clips % d == 0)


def validate_name(kind: str, name: str) -> str:
    """Feature set / run names become group paths: letters, digits, ``_.+@=-``, '/'-separated.

    A part ``.`` or ``..`` would name another group (zarr refuses such paths only once writing).
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"invalid {kind} name {name!r}: use letters, digits and _ . + @ = -, "
                         f"with '/' between non-empty parts (e.g. 'clip/ViT-B-32')")
    if {".", ".."} & set(name.split("/")):
        raise ValueError(f"invalid {kind} name {name!r}: '.' and '..' cannot be parts of a name "
                         f"(e.g. 'clip/ViT-B-32')")
    return name


def init_layout(arrays: StoreArrays) -> None:
    """Create the groups and empty index columns of a new store (what exists already is kept)."""
    if arrays.read_only:
        raise StoreFormatError(f"{arrays.location} is not a feature store (no index group)")
    for group in ("index", "index/split", "features", "predictions", "class_features"):
        arrays.create_group(group)
    attrs = arrays.attrs("")
    if "schema_version" not in attrs:
        from importlib.metadata import PackageNotFoundError, version

        try:
            created_by = f"avscene {version('avscene')}"
        except PackageNotFoundError:
            created_by = "avscene (not installed)"
        arrays.set_attrs("", {"schema_version": SCHEMA_VERSION, "classes": [], "dataset": "",
                              "created_by": created_by, "n_clips": 0})
    for name in _INDEX_STRINGS:
        if not arrays.exists(f"index/{name}"):
            arrays.create_array(f"index/{name}", (0,), STRING, INDEX_CHUNK_ROWS, "")
    if not arrays.exists("index/label"):
        arrays.create_array("index/label", (0,), "int16", INDEX_CHUNK_ROWS, -1)


def check_schema(arrays: StoreArrays) -> int:
    """The store's schema version; one this library cannot read is refused in one line."""
    found = arrays.attrs("").get("schema_version")
    if found not in READABLE_SCHEMAS:
        raise StoreFormatError(f"{arrays.location}: schema version {found!r}, this library reads "
                               f"versions {', '.join(map(str, READABLE_SCHEMAS))}")
    return int(found)
