"""The store's clip index: ids, the persisted id -> row lookup, and the index columns, read lazily.

At a million clips, decoding ``index/clip_id`` whole (a Python string per clip) to build an id dict
costs seconds per process. So an append also writes a *lookup* beside the columns: every id's
128-bit key (XXH3-128 of its UTF-8 bytes; lookups written before it use BLAKE2b, read as they are)
with its row, sorted by key (``index/lookup/<n>/table``, ``[n, 3]`` uint64:
key high, key low, row; sharded, inner chunks of ``LOOKUP_INNER_ROWS``), plus ``fence``, the first
key-high of each inner chunk. Resolving ids reads the fence once and, per id, the one inner chunk its
key falls in (from memory-mapped shards where the store is local: 1.5 KiB and a crc32c per id; a
remote or HDF5 table is read whole for many ids). Other columns are decoded only when asked for.

Kill-safety: the lookup is written under a new name (the row count it covers) before the append's
commit, and the root attribute ``index_lookup`` that names it is part of that same commit (the
update that sets ``n_clips``). A reader trusts a lookup only when it covers exactly the committed
rows; a killed append leaves an orphan the next writable open deletes. A store without a lookup (the
layout before it, or ids whose keys collide: practically never at 128 bits) is read as
before: the ids are decoded and a dict built in memory. ``featurestore convert`` or the next append
writes one.
"""
from __future__ import annotations

import hashlib
from bisect import bisect_left, bisect_right
from itertools import repeat
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np
import xxhash

from featurestore.errors import FeatureStoreError, UnknownClipError
from featurestore.store._backend import distinct, join
from featurestore.store.arrays import StoreArrays

LOOKUP_ATTR = "index_lookup"  # root attribute: {"path", "n_clips", "key"} of the lookup in use
VALUES_ATTR = "index_values"  # root attribute: {"n_clips", "city": [distinct values]} for summaries
LOOKUP_GROUP = "index/lookup"
# the key of new lookups: XXH3-128 hashes a million ids in ~0.15 s, BLAKE2b (the key before it, still
# read, and kept by appends to a store whose lookup has it) in ~0.6 s of a million-clip store's creation
LOOKUP_KEY = "xxh3-128"
_KEYS = {"xxh3-128": xxhash.xxh3_128_digest,
         "blake2b-128": lambda b: hashlib.blake2b(b, digest_size=16).digest()}
# The table is sharded (Zarr v3 sharding, as feature sets are): an id costs one inner chunk of
# LOOKUP_INNER_ROWS rows (64 x 24 bytes = 1.5 KiB, its own crc32c), found through the fence (the first
# key of each inner chunk: 15,625 keys, 122 KiB at 1M clips); shards of up to 2**20 rows (24 MiB, one
# file per million clips). 1,024 random ids read ~1,000 such blocks from the memory-mapped shard
# instead of the whole 24 MiB table (docs/store.md, bench_scale.py --lookup-sweep)
LOOKUP_INNER_ROWS = 64
LOOKUP_SHARD_ROWS = 2**20
# beyond this many ids (or table blocks) per call, a table that cannot be memory-mapped (remote, HDF5,
# unsharded) is read whole once (and kept) instead of block by block
_BULK_IDS = 64
_TABLE_CHUNKS_KEPT = 256
# ids resolved a few at a time are kept (id -> row) up to this many, oldest dropped first: a warm `get`
# of a clip asked before is a dict lookup, not a hash + binary search (at 1M clips 0.2 ms of a 0.4 ms
# warm get, loaded), and asking the same ids again does not count towards decoding the id column
_RECENT_IDS = 4096
# distinct values kept in VALUES_ATTR per column; a column with more is summarised by reading it
_MAX_DISTINCT = 1000
_LOW_HALF = (1 << 64) - 1
_KEY_BATCH = 16384  # ids hashed per join (id_keys)
#: index arrays that are not per-clip columns (``FeatureStore.columns`` leaves them out)
NOT_COLUMNS = ("split", "lookup")


def id_keys(clip_ids: Iterable[str], key: str = LOOKUP_KEY) -> np.ndarray:
    """``[n, 2]`` uint64: the 128-bit ``key`` (a ``_KEYS`` name) of each id's UTF-8 bytes (high, low,
    big-endian digest halves), as the lookup sorts them.

    Hashed ``_KEY_BATCH`` ids at a time: one join over a million ids held a million digest objects
    (~50 MB of fresh pages, faulted in and handed back: 0.17 s where the hashing takes 0.07 s)."""
    if not isinstance(clip_ids, (list, tuple, np.ndarray)):
        clip_ids = list(clip_ids)
    digest = _KEYS[key]
    out = np.empty((len(clip_ids), 2), dtype=np.uint64)
    halves = out.reshape(-1)
    for low in range(0, len(clip_ids), _KEY_BATCH):
        batch = clip_ids[low:low + _KEY_BATCH]
        try:
            digests = b"".join(map(digest, map(str.encode, batch)))
        except UnicodeEncodeError:  # a lone surrogate: manifests refuse it, so its key matches no stored id
            digests = b"".join(digest(cid.encode("utf-8", "surrogatepass")) for cid in batch)
        halves[2 * low:2 * (low + len(batch))] = np.frombuffer(digests, dtype=">u8")
    return out


def check_clip_ids(clip_ids: Sequence[Any]) -> None:
    """TypeError unless every id is a str (numpy's are): an int keyed as its text would find the
    clip named "5" for 5 where the caller meant a row, and only on some paths (the decoded ids do not)."""
    if not all(map(isinstance, clip_ids, repeat(str))):  # a C loop: a generator cost 0.1-0.2 ms per 1,024 ids
        bad = next(cid for cid in clip_ids if not isinstance(cid, str))
        raise TypeError(f"clip ids are strings, got the {type(bad).__name__} {bad!r}"
                        f"{' (rows are read with read_rows)' if isinstance(bad, (int, np.integer)) else ''}")


def lookup_table(keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``[n, 3]`` uint64 (key high, key low, row) sorted by key."""
    order = key_order(keys)
    table = np.empty((len(keys), 3), dtype=np.uint64)
    table[:, :2] = np.take(keys, order, axis=0)  # (a fancy index of [n, 2] rows took 5x as long)
    table[:, 2] = rows[order]
    return table


def key_order(keys: np.ndarray) -> np.ndarray:
    """The order that sorts ``keys`` (``[n, 2]`` uint64: high, low halves).

    One sort of plain values, not an argsort: each key's high half with its lowest bits replaced
    by its position (a million keys in ~50 ms, where a stable argsort of the high halves took
    ~120 ms and a two-key lexsort several times that), the positions read back from the sorted
    values. Keys whose remaining high bits are equal (a few pairs in ten million random keys)
    come out in position order; each such run is then put in key order on its own."""
    n = len(keys)
    bits = max(1, (n - 1).bit_length())
    position = np.uint64((1 << bits) - 1)
    packed = (keys[:, 0] & ~position) | np.arange(n, dtype=np.uint64)
    packed.sort()
    order = (packed & position).astype(np.intp)
    tied = np.flatnonzero((packed[1:] >> np.uint64(bits)) == (packed[:-1] >> np.uint64(bits)))
    for start, stop in _runs(tied):
        run = order[start:stop]
        order[start:stop] = run[np.lexsort((keys[run, 1], keys[run, 0]))]
    return order


def _runs(tied: np.ndarray) -> list[tuple[int, int]]:
    """``(start, stop)`` of each run of equal neighbours, from the positions ``i`` where entry
    ``i`` equals entry ``i + 1`` (sorted)."""
    if not len(tied):
        return []
    breaks = np.flatnonzero(np.diff(tied) > 1)
    starts = np.r_[tied[0], tied[breaks + 1]]
    stops = np.r_[tied[breaks], tied[-1]] + 2
    return list(zip(starts.tolist(), stops.tolist()))


def equal_key_runs(table: np.ndarray) -> list[tuple[int, int]]:
    """``(start, stop)`` of each run of entries sharing a key in a sorted ``table``: the same id more
    than once, or (practically never at 128 bits) different ids sharing a key."""
    return _runs(np.flatnonzero((table[1:, 0] == table[:-1, 0]) & (table[1:, 1] == table[:-1, 1])))


def search_table(table: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Row of each key in a sorted ``table`` (see :func:`lookup_table`), -1 where it is absent."""
    out = np.full(len(keys), -1, dtype=np.int64)
    if not len(table) or not len(keys):
        return out
    left = np.searchsorted(table[:, 0], keys[:, 0], "left")
    right = np.searchsorted(table[:, 0], keys[:, 0], "right")
    single = np.flatnonzero(right - left == 1)
    hit = table[left[single], 1] == keys[single, 1]
    out[single[hit]] = table[left[single[hit]], 2].astype(np.int64)
    for i in np.flatnonzero(right - left > 1):  # equal high halves: practically never
        span = table[left[i]:right[i]]
        match = np.flatnonzero(span[:, 1] == keys[i, 1])
        if len(match):
            out[i] = int(span[match[0], 2])
    return out


class _OneLookup(NamedTuple):
    """The lookup in use as ``ClipIndex._find_one`` reads it."""

    path: str  # the table
    per: int  # entries per table block (inner chunk)
    key: Callable[[bytes], bytes]  # the 128-bit key of an id's UTF-8 bytes
    fence: memoryview  # first key high of each block, as Python integers


class ClipIndex:
    """The index of one open store; everything is read on first use and kept until :meth:`forget`."""

    def __init__(self, arrays: StoreArrays):
        self._arrays = arrays
        self.forget()

    def forget(self) -> None:
        """Drop what was read: the next use sees what other processes committed since."""
        self._n: int | None = None
        self._ids: list[str] | None = None
        self._row_of: dict[str, int] | None = None
        self._meta: dict | None | bool = False  # False: not looked at yet
        self._fence: np.ndarray | None = None
        self._one: _OneLookup | None = None  # the lookup as a single id's search uses it
        self._table: np.ndarray | None = None
        self._chunks: dict[int, np.ndarray] = {}
        self._looked_up = 0  # ids resolved through the lookup so far (see find)
        self._recent: dict[str, int] = {}  # the last _RECENT_IDS ids resolved a few at a time

    # ----------------------------------------------------------------------------- row count, ids
    def committed_rows(self) -> int:
        """Rows a finished append committed (root ``n_clips``; version 1 stores: the id column)."""
        n = self._arrays.attrs("").get("n_clips")
        return int(n) if n is not None else self._arrays.shape("index/clip_id")[0]

    @property
    def n_clips(self) -> int:
        if self._n is None:
            self._n = self.committed_rows()
        return self._n

    @property
    def clip_ids(self) -> list[str]:
        """Every id in row order (decodes the id column once: slow at millions of clips)."""
        if self._ids is None:
            self._ids = [str(i) for i in self._arrays.read("index/clip_id", 0, self.n_clips)]
        return self._ids

    def ids_at(self, rows: Sequence[int] | np.ndarray) -> list[str]:
        """Ids of some rows, reading only the chunks of the id column that hold them."""
        rows = np.asarray(rows, dtype=np.int64)
        if self._ids is not None or not len(rows):
            return [self.clip_ids[r] for r in rows]
        per = self._arrays.chunk_rows("index/clip_id")
        out: list[str] = [""] * len(rows)
        for chunk in distinct(rows // per):
            start, stop = int(chunk) * per, min(self.n_clips, (int(chunk) + 1) * per)
            texts = self._arrays.read("index/clip_id", start, stop)
            for i in np.flatnonzero(rows // per == chunk):
                out[i] = str(texts[rows[i] - start])
        return out

    def column(self, name: str) -> np.ndarray:
        """One index column (``label``, ``city``, ``split/<name>``, ...) for every clip, in row order."""
        return self._arrays.read(f"index/{name}", 0, self.n_clips)

    def distinct(self, name: str) -> list[str]:
        """Sorted distinct non-empty values of a string column (``city``), from the summary an
        append keeps in the root attributes when there is one, else by reading the column."""
        values = self._arrays.attrs("").get(VALUES_ATTR) or {}
        if values.get("n_clips") == self.n_clips and isinstance(values.get(name), list):
            return list(values[name])
        return sorted({str(v) for v in self.column(name)} - {""})

    # ---------------------------------------------------------------------------------- lookups
    def row(self, clip_id: str) -> int:
        """Row of one id; an unknown id raises ``UnknownClipError`` with the nearest ids."""
        found = self.find_one(clip_id)
        if found < 0:
            raise UnknownClipError(clip_id, self.clip_ids)
        return found

    def rows(self, clip_ids: Sequence[str]) -> np.ndarray:
        """Rows of ids; an unknown id raises ``UnknownClipError`` with the nearest ids."""
        clip_ids = list(clip_ids)
        found = self.find(clip_ids)
        missing = np.flatnonzero(found < 0)
        if len(missing):
            raise UnknownClipError(clip_ids[missing[0]], self.clip_ids)
        return found

    def find(self, clip_ids: Sequence[str]) -> np.ndarray:
        """Row of each id, -1 where it is not in the index.

        Through the persisted lookup while few ids were asked (opening stays constant time); once
        the ids looked up a few at a time add up to a sixteenth of the index, the id column is decoded into a dict
        once, so a loop of single ``get`` calls costs a dict lookup each, as it did before the lookup
        existed (the same break-even as the done mask's). Ids found a few at a time are kept
        (``_RECENT_IDS``), so asking them again costs a dict lookup and counts towards nothing.
        """
        check_clip_ids(clip_ids)
        if len(clip_ids) == 1:
            return np.array([self.find_one(clip_ids[0])], dtype=np.int64)
        few = len(clip_ids) <= _BULK_IDS
        if few and self._row_of is None and all(c in self._recent for c in clip_ids):
            return np.fromiter((self._recent[c] for c in clip_ids), dtype=np.int64, count=len(clip_ids))
        if self._row_of is None and few and self._lookup() is not None:
            self._looked_up += len(clip_ids)  # bulk asks read the whole table instead: cheap already
            if self._looked_up > max(_BULK_IDS, self.n_clips // 16):
                self._row_dict()
        if self._row_of is None and self._lookup() is not None:
            found = self._through_lookup(lambda: self._find_in_lookup(id_keys(clip_ids, self._lookup()["key"])))
            if found is not None:
                if few:
                    self._remember(clip_ids, found)
                return found
        row_of = self._row_dict()
        return np.fromiter((row_of.get(c, -1) for c in clip_ids), dtype=np.int64, count=len(clip_ids))

    def find_one(self, clip_id: str) -> int:
        """``find`` of one id (-1: not in the index) in integer steps, no array made on the way: a
        cold single ``get`` pays its id's hash, a bisection of the fence and of one table block."""
        if not isinstance(clip_id, str):
            check_clip_ids([clip_id])
        if self._row_of is None:
            row = self._recent.get(clip_id)
            if row is not None:
                return row
            if self._lookup() is not None:
                self._looked_up += 1
                if self._looked_up <= max(_BULK_IDS, self.n_clips // 16):
                    row = self._through_lookup(lambda: self._lookup_one(clip_id))
                    if row is not None:
                        if row >= 0:
                            self._remember_one(clip_id, row)
                        return row
        return self._row_dict().get(clip_id, -1)

    def _through_lookup(self, find: Callable[[], Any]) -> Any:
        """What ``find`` answers from the lookup, or None where an append replaced the lookup since
        (the ids themselves are used from then on); damage is raised as it is, never served around."""
        try:
            return find()
        except FeatureStoreError:
            if self._lookup_exists():
                raise
            self._meta, self._one = None, None
            return None

    def known_row(self, clip_id: str) -> int | None:
        """The row of an id resolved before (kept, or in the decoded id dict), else None: nothing read."""
        return (self._recent if self._row_of is None else self._row_of).get(clip_id)

    def _remember_one(self, clip_id: str, row: int) -> None:
        """``_remember`` of one id not kept yet."""
        self._recent[clip_id] = row
        if len(self._recent) > _RECENT_IDS:
            del self._recent[next(iter(self._recent))]

    def _remember(self, clip_ids: Sequence[str], rows: np.ndarray) -> None:
        """Keep the rows of ids found (oldest dropped first beyond ``_RECENT_IDS``)."""
        for cid, row in zip(clip_ids, rows.tolist()):
            if row >= 0:
                self._recent.pop(cid, None)
                self._recent[cid] = row
        while len(self._recent) > _RECENT_IDS:
            del self._recent[next(iter(self._recent))]

    def _row_dict(self) -> dict[str, int]:
        if self._row_of is None:
            self._row_of = {cid: row for row, cid in enumerate(self.clip_ids)}
        return self._row_of

    def ids_digest(self) -> str | None:
        """A digest of every id in row order (of the lookup table, kept with it), or None without a
        lookup or with one written before digests. Equal digests: the same ids in the same order."""
        meta = self._lookup()
        return None if meta is None else meta.get("digest")

    def _lookup(self) -> dict | None:
        """The root attribute naming the lookup, when it covers exactly the committed rows."""
        if self._meta is False:
            meta = self._arrays.attrs("").get(LOOKUP_ATTR)
            ok = (isinstance(meta, dict) and meta.get("key") in _KEYS and meta.get("n_clips") == self.n_clips
                  # where appends write it (a path out of the store, '..', is zarr's ValueError on every lookup)
                  and meta.get("path") == join(LOOKUP_GROUP, str(self.n_clips))
                  and self._arrays.is_array(join(str(meta.get("path")), "table")))
            self._meta = meta if ok else None
        return self._meta or None

    def _lookup_exists(self) -> bool:
        meta = self._meta or {}
        return bool(meta) and self._arrays.exists(join(str(meta.get("path")), "table"))  # not cached

    def _find_in_lookup(self, keys: np.ndarray) -> np.ndarray:
        """Rows of ``keys`` (-1: absent): the fence names each key's table block (an inner chunk of a
        sharded table), the blocks are read together, and each key is matched within its block."""
        path = join(self._lookup()["path"], "table")
        fence = self._fence_keys()
        block = np.maximum(np.searchsorted(fence, keys[:, 0], "right") - 1, 0)  # the last that can hold it
        found = self._match_in_blocks(path, keys, block)
        # a key whose high half starts its block may sit at the end of blocks before it when they end
        # with the same high half (64 equal bits: practically never); those are searched in full
        missing = np.flatnonzero(found < 0)  # (the fence searched again only for these)
        first = np.maximum(np.searchsorted(fence, keys[missing, 0], "left") - 1, 0)
        earlier = first < block[missing]
        for i, j in zip(missing[earlier].tolist(), first[earlier].tolist()):
            table = self._block_rows(path, np.arange(j, block[i] + 1)).reshape(-1, 3)
            found[i] = search_table(table[table[:, 2] != np.uint64(2**64 - 1)], keys[i:i + 1])[0]
        found[found >= self.n_clips] = -1  # a reader trusts only committed rows
        return found

    def _lookup_one(self, clip_id: str) -> int:
        """Row of one id (-1: absent) through the lookup: ``_find_one``, else ``_find_in_lookup``."""
        row = self._find_one(clip_id)
        if row is None:
            row = int(self._find_in_lookup(id_keys([clip_id], self._lookup()["key"]))[0])
        return row

    def _find_one(self, clip_id: str) -> int | None:
        """Row of one id (-1: absent) in integer steps: its key, a bisection of the fence, then of its
        table block, a read-only view of the mapped table read as Python integers (numpy calls on
        one scalar cost ~0.5 us each, most of a cold ``get``'s lookup); None where that does not
        answer (a table that cannot be mapped, or equal high halves of keys: practically never;
        ``_find_in_lookup`` then does)."""
        one = self._one or self._one_lookup()
        try:
            key = int.from_bytes(one.key(clip_id.encode("utf-8")), "big")
        except UnicodeEncodeError:  # a lone surrogate: no stored id holds one (manifests refuse them)
            return -1
        hi, lo = key >> 64, key & _LOW_HALF
        block = max(bisect_right(one.fence, hi) - 1, 0)
        view = self._arrays.chunk(one.path, block, True)
        if view is None or view.dtype != np.uint64 or not view.flags.c_contiguous:
            return None
        size = min(one.per, self.n_clips - block * one.per)
        entries = memoryview(view).cast("B").cast("Q")  # key high, key low, row of each entry in turn
        highs = entries[:3 * size:3]
        at = bisect_left(highs, hi)
        if at + 1 < size and highs[at + 1] == hi:
            return None
        if at < size and highs[at] == hi and entries[3 * at + 1] == lo:
            row = entries[3 * at + 2]
            return row if row < self.n_clips else -1
        # not in its block: absent, unless equal high halves may run on from the block before
        return None if one.fence[block] == hi else -1

    def _one_lookup(self) -> _OneLookup:
        """What ``_find_one`` needs of the lookup in use, found once (``forget`` drops it)."""
        meta = self._lookup()
        path = join(meta["path"], "table")
        fence = memoryview(np.ascontiguousarray(self._fence_keys(), dtype=np.uint64))
        self._one = _OneLookup(path, self._arrays.inner_rows(path), _KEYS[meta["key"]], fence)
        return self._one

    def _fence_keys(self) -> np.ndarray:
        if self._fence is None:
            fence_path = join(self._lookup()["path"], "fence")
            self._fence = self._arrays.read(fence_path, 0, self._arrays.shape(fence_path)[0])
        return self._fence

    def _match_in_blocks(self, path: str, keys: np.ndarray, blocks: np.ndarray) -> np.ndarray:
        """Row of each key within its table block (``blocks``: per key), -1 where it is not there."""
        found = self._bisect_blocks(path, keys, blocks)  # a single id is usually found by _find_one first
        if found is not None:
            return found
        # a table that cannot be mapped: the keys' blocks, each read once, in block order, searched by key
        # (a [keys, block rows] comparison was 4 GB for 12,291 keys in a table of 16,384-row blocks)
        table = self._block_rows(path, distinct(blocks)).reshape(-1, 3)
        return search_table(table[table[:, 2] != np.uint64(2**64 - 1)], keys)

    def _bisect_blocks(self, path: str, keys: np.ndarray, blocks: np.ndarray) -> np.ndarray | None:
        """Many keys at once by a binary search of every key's block together, on read-only views of
        the memory-mapped table's blocks (each block's crc32c checked once per mapping): each step is
        one numpy gather of one entry per key (log2 of the block's rows + 1 steps, never a copy of
        whole blocks: a fresh 1.5 MiB buffer a call costs its page faults, and a ``gather`` through
        the backend per step cost ~0.1 ms, most of a 1,024-id lookup). None where the table cannot
        be mapped."""
        got = self._arrays.chunk_grids(path, blocks)
        if got is None:
            return None
        grids, where, local = got
        per, n = self._arrays.inner_rows(path), self.n_clips
        found = np.full(len(keys), -1, dtype=np.int64)
        for g, grid in enumerate(grids):
            at = np.arange(len(keys)) if len(grids) == 1 else np.flatnonzero(where == g)
            found[at] = _bisect_grid(grid, local[at], keys[at], np.minimum(per, n - blocks[at].astype(np.int64) * per))
        return found

    def _block_rows(self, path: str, numbers: np.ndarray) -> np.ndarray:
        """Table blocks ``numbers`` (rows per block: the fence's spacing) as ``[len, per, 3]``; rows past
        the table's end hold an impossible entry (row 2**64 - 1, found as absent).

        From memory-mapped shards where the backend has them (each block's crc32c checked once per
        mapping), else the whole table once for many blocks, else block by block (kept)."""
        per = self._arrays.inner_rows(path)
        if len(numbers) == 1 and (int(numbers[0]) + 1) * per <= self.n_clips:  # one whole block
            start = int(numbers[0]) * per
            block = self._arrays.gather(path, np.arange(start, start + per), np.ones(per, dtype=bool))
            if block is not None:
                return block[None]
        rows = (numbers[:, None] * per + np.arange(per)).reshape(-1)
        inside = rows < self.n_clips
        out = np.zeros((len(rows), 3), dtype=np.uint64)
        out[~inside, 2] = np.uint64(2**64 - 1)
        mapped = self._arrays.gather(path, rows[inside], np.ones(int(inside.sum()), dtype=bool))
        if mapped is not None:
            out[inside] = mapped
        elif self._table is not None or len(numbers) > _BULK_IDS:
            if self._table is None:
                self._table = self._arrays.read(path, 0, self.n_clips)
            out[inside] = self._table[rows[inside]]
        else:
            for i, number in enumerate(numbers.tolist()):
                block = self._table_chunk(path, number, per)
                out[i * per:i * per + len(block)] = block
        return out.reshape(len(numbers), per, 3)

    def _table_chunk(self, path: str, chunk: int, per: int) -> np.ndarray:
        block = self._chunks.get(chunk)
        if block is None:
            block = self._arrays.read(path, chunk * per, min(self.n_clips, (chunk + 1) * per))
            if len(self._chunks) >= _TABLE_CHUNKS_KEPT:
                self._chunks.pop(next(iter(self._chunks)))
            self._chunks[chunk] = block
        return block

    # ----------------------------------------------------------------------------------- writes
    def append_table(self, new_ids: Sequence[str], start: int) -> np.ndarray:
        """The lookup table (key, row; sorted by key) of rows ``0:start+len(new_ids)``: the committed
        rows' entries and those of ``new_ids`` appended at row ``start``.

        The new ids are keyed once, as the store's lookup is (an append to a store whose lookup has
        an older key keeps that key: the old entries are read, not recomputed, as ``convert`` keeps
        it); ``append_clips`` finds repeated ids as runs of equal keys in it (``equal_key_runs``),
        and ``prepare_append`` writes it."""
        new = lookup_table(id_keys(new_ids, self._append_key(start)),
                           np.arange(start, start + len(new_ids), dtype=np.uint64))
        return _merge(self._old_table(start), new)

    def _append_key(self, start: int) -> str:
        """The key new rows at ``start`` are hashed with: the store's lookup's (an older BLAKE2b kept)."""
        return self._lookup()["key"] if start and self._lookup() is not None else LOOKUP_KEY

    def prepare_append(self, table: np.ndarray, new_cities: Iterable[str], start: int,
                       shared_keys: bool) -> dict[str, Any]:
        """Write the lookup ``table`` (``append_table``'s: rows ``0:len(table)``); return the root
        attributes to commit with the new ``n_clips`` (the lookup's name, the distinct-value summary).

        ``shared_keys``: different ids share a key in the table (practically never), so no lookup is
        written and ids are found through the id column. ``new_cities``: the new rows' distinct
        cities are enough. Called by ``append_clips`` after the duplicate check, before its commit.
        Nothing written here is read until that commit names it.
        """
        end = len(table)
        attrs: dict[str, Any] = {VALUES_ATTR: self._values_after(new_cities, start, end)}
        key = self._append_key(start)
        attrs[LOOKUP_ATTR] = None if shared_keys or not end else self._write_lookup(table, end, key)
        return attrs

    def _old_table(self, start: int) -> np.ndarray:
        if not start:
            return np.zeros((0, 3), dtype=np.uint64)
        if self._lookup() is not None:
            return self._arrays.read(join(self._lookup()["path"], "table"), 0, start)
        return lookup_table(id_keys(self.clip_ids), np.arange(start, dtype=np.uint64))

    def _values_after(self, new_cities: Sequence[str], start: int, end: int) -> dict[str, Any]:
        old = set(self.distinct("city")) if start else set()
        cities = sorted((old | {str(c) for c in set(new_cities)}) - {""})  # str() per distinct value
        return {"n_clips": end, "city": cities if len(cities) <= _MAX_DISTINCT else None}

    def _write_lookup(self, table: np.ndarray, end: int, key: str) -> dict[str, Any]:
        group = join(LOOKUP_GROUP, str(end))
        per = LOOKUP_INNER_ROWS
        shard = min(LOOKUP_SHARD_ROWS, -(-len(table) // per) * per)
        fence = table[::per, 0].copy()
        self._arrays.create_group(LOOKUP_GROUP)
        self._arrays.create_group(group)
        self._arrays.create_array(join(group, "table"), table.shape, "uint64", shard, 0, inner_rows=per)
        self._arrays.write(join(group, "table"), 0, table)
        self._arrays.create_array(join(group, "fence"), fence.shape, "uint64", max(1, len(fence)), 0)
        self._arrays.write(join(group, "fence"), 0, fence)
        # the table is a function of the ids in row order: equal digests, equal ids (shared.py); XXH3
        # (its keys' hash) takes ~2 ms for a million clips' table where BLAKE2b took ~30 ms. The name
        # prefix keeps it from ever equalling a digest of another kind (those stores' ids are compared)
        return {"path": group, "n_clips": end, "key": key,
                "digest": "xxh3-128:" + xxhash.xxh3_128_hexdigest(np.ascontiguousarray(table))}  # (no copy)

    def write_missing(self) -> dict[str, Any] | None:
        """Write a lookup for a store without one (``convert``); the root attributes to set, or None."""
        n = self.n_clips
        if self._lookup() is not None or not n:
            return None
        table = self.append_table(self.clip_ids, 0)  # one append of all
        return self.prepare_append(table, set(self.column("city").tolist()), 0, bool(equal_key_runs(table)))

    def lookup_problem(self, clip_ids: Sequence[str] | None = None) -> str | None:
        """How the lookup disagrees with the id column, or None (also None when there is no lookup).

        Checksums catch flipped bits in the table; this catches a table that is whole but wrong (one
        written from other ids), which would send ids to the wrong rows. For ``verify``: it hashes
        every id (about a second a million clips); ``clip_ids``, when the caller decoded them
        already, saves decoding them again.
        """
        if self._lookup() is None:
            return None
        table = self._arrays.read(join(self._lookup()["path"], "table"), 0, self.n_clips)
        ids = self.clip_ids if clip_ids is None else clip_ids
        expected = lookup_table(id_keys(ids, self._lookup()["key"]), np.arange(self.n_clips, dtype=np.uint64))
        if table.shape != expected.shape or not np.array_equal(table, expected):
            wrong = int((table != expected).any(axis=1).sum()) if table.shape == expected.shape else self.n_clips
            return (f"{wrong} of {self.n_clips} lookup entries do not match the clip ids "
                    f"(ids would resolve to wrong rows)")
        return None

    def drop_unused(self) -> None:
        """Delete lookups the committed root attribute does not name (a killed append's, a replaced
        one). Writers only: a reader of the replaced one falls back to the ids (see ``find``)."""
        if not self._arrays.exists(LOOKUP_GROUP):
            return
        meta = self._arrays.attrs("").get(LOOKUP_ATTR) or {}
        for name in self._arrays.children(LOOKUP_GROUP):
            if join(LOOKUP_GROUP, name) != meta.get("path"):
                self._arrays.delete(join(LOOKUP_GROUP, name))


def _merge(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Two tables sorted by key as one: each new entry placed after the old entries whose high half
    is not above its own (no re-sort of a million old entries for a few new ones); where high halves
    are equal (practically never), the run is put in key order."""
    if not len(old):
        return new
    at = np.searchsorted(old[:, 0], new[:, 0], "right") + np.arange(len(new))
    is_new = np.zeros(len(old) + len(new), dtype=bool)
    is_new[at] = True
    table = np.empty((len(is_new), 3), dtype=np.uint64)
    table[is_new] = new
    table[~is_new] = old
    for start, stop in _runs(np.flatnonzero(table[1:, 0] == table[:-1, 0])):
        run = table[start:stop]
        table[start:stop] = run[np.lexsort((run[:, 1], run[:, 0]))]
    return table


def _bisect_grid(grid: np.ndarray, blocks: np.ndarray, keys: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Row of each key (-1: absent) in its block of a table grid (``[blocks, per, 3]``: key high,
    key low, row; sorted by key within each block), of which the first ``sizes`` entries count."""
    lo, hi = np.zeros(len(keys), dtype=np.int64), sizes.copy()
    last = grid.shape[1] - 1
    while (lo < hi).any():
        mid = (lo + hi) // 2
        entries = grid[blocks, np.minimum(mid, last)]
        below = (entries[:, 0] < keys[:, 0]) | ((entries[:, 0] == keys[:, 0]) & (entries[:, 1] < keys[:, 1]))
        searching = lo < hi
        lo = np.where(searching & below, mid + 1, lo)
        hi = np.where(searching & ~below, mid, hi)
    entries = grid[blocks, np.minimum(lo, last)]
    hit = (lo < sizes) & (entries[:, 0] == keys[:, 0]) & (entries[:, 1] == keys[:, 1])
    return np.where(hit, entries[:, 2].astype(np.int64), -1)
