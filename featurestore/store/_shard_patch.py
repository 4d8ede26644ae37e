"""A partial commit of a local shard that writes what changed, not the whole shard.

Extraction commits the shard it is filling every minute (a kill loses at most that): the rows done
since the last commit are new, the rows done before are the stored bits. Encoding and writing the
whole shard again cost ~0.6 s at 32 MiB (with the earlier rows read back), so a shard in the layout
this store writes (every inner chunk present, in order, uncompressed: ``_Mapped``'s uniform layout,
its index unchanged by a rewrite) is instead copied in the kernel into a temp file (``sendfile``, no
bytes through Python), the changed inner chunks (bytes + crc32c) are written over their places, and
the temp file is renamed over the shard: as atomic as a whole write, a kill never tears the shard.
Anything else (a shard absent, compressed, of another layout, remote) is written whole as before.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import zarr

from featurestore.store._file_writes import replacing
from featurestore.store._shards import _CRC, ShardLayout, _shard_key, encode_inner_chunks, is_uniform_index, local_file


def changed_inner_chunks(layout: ShardLayout, changed: np.ndarray) -> np.ndarray:
    """Inner chunks (numbered within the block) holding a changed row (``changed``: bool per row)."""
    return np.flatnonzero(np.add.reduceat(changed, np.arange(0, len(changed), layout.inner_rows)) > 0)


def patch_shard(arr: zarr.Array, layout: ShardLayout, shard: int, block: np.ndarray, changed: np.ndarray) -> bool:
    """Write the inner chunks of ``block`` (all rows of shard ``shard``) that hold ``changed`` rows into
    a copy of the shard file renamed over it; False (nothing written) where the shard is not a local,
    uncompressed, uniformly laid out file with room for exactly these rows' inner chunks."""
    path = local_file(arr, _shard_key(arr, shard)) if not layout.zstd else None
    n_inner = -(-len(block) // layout.inner_rows)
    if path is None or len(block) % layout.inner_rows or not _uniform(path, layout, n_inner):
        return False
    chunks = changed_inner_chunks(layout, changed)
    if not len(chunks):
        return True  # nothing to write: the stored shard holds these rows already
    raw = np.ascontiguousarray(block, dtype=layout.dtype).reshape(n_inner, -1).view(np.uint8)
    length = layout.inner_bytes + _CRC
    with replacing(path) as tmp:
        shutil.copyfile(path, tmp)  # in the kernel (sendfile / copy_file_range)
        fd = os.open(tmp, os.O_WRONLY)
        try:
            for run in np.split(chunks, np.flatnonzero(np.diff(chunks) != 1) + 1):  # one write per run
                encoded = np.empty((len(run), length), dtype=np.uint8)
                encode_inner_chunks(raw[run[0]:run[-1] + 1], encoded)
                os.pwrite(fd, memoryview(encoded).cast("B"), int(run[0]) * length)
        except OSError as err:  # pwrite names no file (disk full)
            raise OSError(err.errno, err.strerror, path) from err
        finally:
            os.close(fd)
    return True


def _uniform(path: str, layout: ShardLayout, n_inner: int) -> bool:
    """Whether the shard file at ``path`` holds ``n_inner`` inner chunks in order, uncompressed, then
    its index (checked against its crc32c), as ``encode_shard`` lays out a shard of that many."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        size = os.fstat(fd).st_size
        length = layout.inner_bytes + _CRC
        if size != n_inner * length + layout.index_bytes:
            return False
        tail = os.pread(fd, layout.index_bytes, size - layout.index_bytes)
    finally:
        os.close(fd)
    return is_uniform_index(layout, tail, n_inner)
