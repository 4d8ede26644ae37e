"""Row-aligned array groups: what feature sets and prediction runs both are.

A row group ``<top>/<name>`` holds one value array whose first axis is the store's clip axis
(``data`` of a feature set, ``probs`` of a prediction run), a ``done`` flag per row and, for feature
sets, an ``errors`` text per row, all chunked alike by whole clips. The rules they share live here
once: ``done`` is written after the values, a row whose ``done`` is false is not there
(``MissingFeatureError``, never fill values), reads go chunk by chunk through a decoded-chunk
cache that never serves a row finished since it was cached, and aligned writers own whole chunks.
"""
from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, TypeVar

import numpy as np

from featurestore.checks import is_int
from featurestore.errors import CorruptChunkError, MissingFeatureError, StoreChangedError, UnknownFeatureError
from featurestore.store._backend import STRING, join
from featurestore.store._cache import ChunkCache
from featurestore.store.arrays import StoreArrays


def _check_storable(array: str, data: np.ndarray, stored: np.dtype) -> None:
    """ValueError unless ``data`` converts to the ``stored`` numbers without losing what it is:
    numpy would drop an imaginary part, truncate floats into an integer set (NaN becomes any
    integer) and wrap integers out of range, all silently."""
    if stored.kind not in "biuf":  # not a set of real numbers (create_feature_set makes none): zarr decides
        return
    kind = data.dtype.kind
    if kind not in "biuf" or (kind == "f" and stored.kind in "biu"):
        raise ValueError(f"{array}: rows are {data.dtype}, expected numbers storable as {stored} "
                         f"(convert them first)")
    if kind in "iu" and stored.kind in "iu" and not np.can_cast(data.dtype, stored) and data.size:
        info = np.iinfo(stored)
        low, high = data.min(), data.max()
        if low < info.min or high > info.max:
            raise ValueError(f"{array}: rows hold integers {low}..{high}, outside {stored}'s "
                             f"{info.min}..{info.max}")


@dataclass(frozen=True)
class RowGroupKind:
    """What tells the kinds of row group apart; everything else they share."""

    top: str  # the group that holds every group of this kind
    leaf: str  # the value array: [n_clips, ...]
    noun: str  # how messages name one group
    with_errors: bool  # an ``errors`` text per row
    missing_label: str  # how MissingFeatureError names a group ({name} is its name)

    @property
    def leaves(self) -> tuple[str, ...]:
        """The group's row arrays: the value array, ``done`` and (feature sets) ``errors``."""
        return (self.leaf, "done") + (("errors",) if self.with_errors else ())


FEATURE_SETS = RowGroupKind("features", "data", "feature set", True, "{name}")
PREDICTION_RUNS = RowGroupKind("predictions", "probs", "prediction run", False, "predictions/{name}")
KINDS = (FEATURE_SETS, PREDICTION_RUNS)


class _Index(Protocol):
    """What a group needs of its store's index: the row count and the ids that messages name."""

    @property
    def n_clips(self) -> int: ...
    @property
    def clip_ids(self) -> list[str]: ...
    def ids_at(self, rows: np.ndarray) -> list[str]: ...


class RowCaches:
    """Decoded chunks and done masks of one store, shared by all its row groups."""

    def __init__(self, cache_bytes: int):
        self.chunks = ChunkCache(cache_bytes)
        self.done: dict[str, np.ndarray] = {}  # group path -> done mask, until refresh
        self.versions: dict[str, str | None] = {}  # group path -> data version, until refresh
        self.tokens: dict[str, Any] = {}  # group path -> its value array's metadata token when last looked
        self.partial_done: dict[str, int] = {}  # group path -> done chunks read without the whole mask
        self.done_chunks: dict[str, dict[int, np.ndarray]] = {}  # group path -> {first row: flags}, same
        # group path -> (inner rows of the values, rows per done chunk): here, not on the RowGroup,
        # so that a set created again with another chunking (same path) is never read with the old
        self.rows_per: dict[str, tuple[int, int]] = {}
        # group path -> how often another writer was seen to replace it (never reset: a read in
        # flight compares it before and after, see ``RowGroup._consistent``)
        self.replaced: dict[str, int] = {}

    def forget(self, path: str) -> None:
        """Drop what is cached of the group at ``path`` and of the groups nested in it."""
        for cache in (self.done, self.versions, self.tokens, self.partial_done, self.done_chunks, self.rows_per):
            for key in [k for k in cache if k == path or k.startswith(path + "/")]:
                del cache[key]
        for kind in KINDS:
            self.chunks.drop(join(path, kind.leaf))

    def drop_done(self) -> None:
        """Forget every group's done flags (an append changed the row count)."""
        self.done.clear()
        self.done_chunks.clear()

    def clear(self) -> None:
        self.chunks.clear()
        self.drop_done()
        self.versions.clear()
        self.tokens.clear()
        self.partial_done.clear()
        self.rows_per.clear()


class RowGroup:
    """One feature set or prediction run: a value array plus per-row ``done`` flags (and errors).

    Obtained from ``FeatureStore.row_group`` / ``row_groups``; the read-only methods (``attrs``,
    ``shape``, ``done_mask``, ``error_texts``, ``missing_arrays``) are public for tools such as
    ``verify``. Writers go through the ``FeatureStore`` methods, which validate their input.
    """

    def __init__(self, kind: RowGroupKind, name: str, arrays: StoreArrays, caches: RowCaches, index: _Index):
        self.kind, self.name = kind, name
        self.path = join(kind.top, name)
        self._arrays, self._caches, self._index = arrays, caches, index
        self._values_path = join(self.path, kind.leaf)

    def __repr__(self) -> str:
        return f"RowGroup({self.kind.noun} {self.name!r})"

    # ------------------------------------------------------------------------------ describing
    @property
    def values_path(self) -> str:
        """The value array: ``<path>/data`` or ``<path>/probs``."""
        return self._values_path

    @property
    def done_path(self) -> str:
        return join(self.path, "done")

    @property
    def errors_path(self) -> str:
        return join(self.path, "errors")

    @property
    def array_paths(self) -> tuple[str, ...]:
        """Every row array the group should hold (values, done, errors)."""
        return tuple(join(self.path, leaf) for leaf in self.kind.leaves)

    def exists(self) -> bool:
        """Whether the value array is there (a creation killed midway may lack the others)."""
        return self._arrays.is_array(self.values_path)

    def missing_arrays(self) -> list[str]:
        """Paths of the row arrays that are absent: an unfinished creation when not empty."""
        return [p for p in self.array_paths if not self._arrays.is_array(p)]

    @property
    def attrs(self) -> dict[str, Any]:
        """The group's attributes (provenance and fingerprint, or a run's head config)."""
        return self._arrays.attrs(self.path)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the value array: ``[rows, n_segments, ...]``."""
        return self._arrays.shape(self.values_path)

    @property
    def dtype(self) -> str:
        return self._arrays.dtype(self.values_path)

    @property
    def chunk_rows(self) -> int:
        return self._arrays.chunk_rows(self.values_path)

    # ------------------------------------------------------------------------ create, delete
    def create(self, shape: tuple[int, ...], dtype: str, chunk_rows: int, attrs: dict[str, Any],
               compressor: str | None = None, inner_rows: int | None = None) -> None:
        """Create the row arrays (values filled with 0, not done, no errors), attributes last.

        ``inner_rows`` (a divisor of ``chunk_rows``) shards the value array: chunks of
        ``chunk_rows`` (what writers write whole) made of inner chunks read on their own.
        The attributes are one update written after the arrays, so a group without them is a
        creation that never finished. They get a new ``data_version`` (see :meth:`data_version`).
        """
        n_rows = shape[0]
        self._arrays.create_group(self.path)
        self._arrays.create_array(self.values_path, shape, dtype, chunk_rows, 0, compressor=compressor,
                                  inner_rows=inner_rows)
        self._arrays.create_array(self.done_path, (n_rows,), "bool", chunk_rows, False)
        if self.kind.with_errors:
            self._arrays.create_array(self.errors_path, (n_rows,), STRING, chunk_rows, "")
        self._arrays.set_attrs(self.path, {**attrs, DATA_VERSION: _new_version()})
        self._caches.versions.pop(self.path, None)

    def delete(self) -> None:
        """Remove the group and forget what is cached of it."""
        self._arrays.delete(self.path)
        self._caches.forget(self.path)

    # ---------------------------------------------------------------------------- data version
    def data_version(self, refresh: bool = False) -> str | None:
        """A token that changes whenever values of finished rows may have changed.

        New at creation (an overwritten set gets another) and whenever rows that are already done
        are written again with other values; finishing new rows changes the done mask instead, and
        done rows written again bit for bit unchanged (a partly committed chunk when its rest is
        written) keep it. So "same done mask and same data version" means "same values", which is
        what caches built from a group's values (search's matrix and faiss index) are keyed by.
        None for groups written before it existed.
        """
        if refresh or self.path not in self._caches.versions:
            self._caches.versions[self.path] = self.attrs.get(DATA_VERSION)
        return self._caches.versions[self.path]

    def _rewriting(self, rows: np.ndarray, values: np.ndarray | None = None,
                   unchanged: np.ndarray | None = None, done: np.ndarray | None = None) -> bool:
        """Whether the write changes what some of ``rows`` that are done already serve; if so, bump
        the data version (see ``_bump``; ``_version_moves`` bumps it again after the write).

        With ``values`` (the new values of ``rows``, in order), done rows written again with the
        very same bits are no rewrite: an extraction that commits a chunk part by part writes the
        rows it finished earlier again, unchanged, and caches keyed by the version stay valid.
        ``unchanged`` (bool per row): rows the caller took from the store itself, so they are the
        stored bits without reading them again; only the other done rows are compared.
        ``done`` (bool per row, the flags the write leaves): a done row left not done is a change
        too. Written again later while not done, it is no rewrite of done rows, and the done mask
        and version would come back as they were: a cache keyed by them (search's matrix and index)
        served the values from before.
        """
        mask = self._done()
        keep = (rows >= 0) & (rows < len(mask))  # out-of-range blocks are refused by the write itself
        was_done = keep.copy()
        was_done[keep] = mask[rows[keep]]
        finished = was_done & ~unchanged if unchanged is not None else was_done
        rewriting = bool(finished.any())
        if rewriting and values is not None and self._same_values(rows[finished], values[finished]):
            rewriting = False
        if not rewriting and done is not None:
            rewriting = bool((was_done & ~done).any())
        if rewriting:
            self._bump()
        return rewriting

    @contextlib.contextmanager
    def _version_moves(self, rewriting: bool) -> Iterator[None]:
        """The write of the block, then a second new data version where ``_rewriting`` bumped one
        before it: a reader that built something in between holds the first token. Also where the
        write fails part way (some chunks may be rewritten), without hiding the write's own error."""
        try:
            yield
        except BaseException:
            if rewriting:
                with contextlib.suppress(Exception):  # (a full disk: the write's own error matters)
                    self._bump()
            raise
        if rewriting:
            self._bump()

    def _same_values(self, rows: np.ndarray, values: np.ndarray) -> bool:
        """Whether ``values`` are bit for bit what is stored for ``rows`` (a damaged chunk: no)."""
        try:
            stored = self.gather(rows, check_done=False)
        except CorruptChunkError:  # the write repairs it: a rewrite, as far as caches can tell
            return False
        new = np.asarray(values).astype(stored.dtype, copy=False)
        return new.shape == stored.shape and new.tobytes() == stored.tobytes()

    def _bump(self) -> None:
        """A new data version, written before and again after a rewrite of done rows: a reader that
        built something in between holds the first token, which the second one retires."""
        version = _new_version()
        self._arrays.set_attrs(self.path, {DATA_VERSION: version})
        self._caches.versions[self.path] = version

    # --------------------------------------------------------------------------- done, errors
    def done_mask(self, refresh: bool = False) -> np.ndarray:
        """Which rows are finished (a copy; read once and kept until ``refresh``)."""
        return self._done(refresh).copy()

    def _done(self, refresh: bool = False) -> np.ndarray:
        mask = self._caches.done.get(self.path)
        if mask is None or refresh:
            if mask is not None or self.path in self._caches.done_chunks:
                self._follow_other_writers()  # flags read before: the group may have been replaced since
            else:
                self._note_version()
            # a missing done chunk reads as "not done": safe (the rows are recomputed), never wrong
            mask = self._arrays.read(self.done_path, 0, self._index.n_clips, written=False).astype(bool)
            self._caches.done[self.path] = mask
            self._arrays.revalidate(self.values_path)  # rows done now may be in shards replaced since mapped
        return mask

    def _done_rows(self, start: int, stop: int) -> np.ndarray:
        """Done flags of rows ``start:stop``: the first few reads of a group read only their done chunk.

        A fresh process's first ``get`` at a million clips would otherwise read every done chunk
        (~80 of ~110 ms). Chunks read so are kept (as the whole mask is, until refresh); after
        ``_PARTIAL_DONE_READS`` of them the whole mask is read and kept, so a loop of gets costs
        what it did (a slice of the kept mask).
        """
        if self.path not in self._caches.done:
            per = self._per()[1]
            first = start - start % per
            if stop <= first + per:
                chunks = self._caches.done_chunks.setdefault(self.path, {})
                flags = chunks.get(first)
                count = self._caches.partial_done.get(self.path, 0)
                if flags is None and count < _PARTIAL_DONE_READS:
                    self._caches.partial_done[self.path] = count + 1
                    stop_chunk = min(self._index.n_clips, first + per)
                    flags = self._arrays.read(self.done_path, first, stop_chunk, written=False).astype(bool)
                    chunks[first] = flags
                    self._arrays.revalidate(self.values_path)
                if flags is not None:
                    return flags[start - first:stop - first]
        return self._done()[start:stop]

    def _per(self) -> tuple[int, int]:
        """(inner rows of the value array, rows per done chunk), asked once per group until it is
        deleted, created again or refreshed (``RowCaches.rows_per``)."""
        per = self._caches.rows_per.get(self.path)
        if per is None:
            self._note_version()
            per = self._caches.rows_per[self.path] = (self._arrays.inner_rows(self.values_path),
                                                      self._arrays.chunk_rows(self.done_path))
        return per

    def _note_version(self) -> None:
        """Remember the data version the arrays' metadata is read under, where nothing is yet."""
        if self.path not in self._caches.versions:
            self._caches.tokens[self.path] = self._arrays.metadata_token(self.values_path)
            self._caches.versions[self.path] = self._arrays.read_attr(self.path, DATA_VERSION)

    def _check_metadata(self) -> None:
        """After a read from storage: where the value array's metadata file changed since it was
        looked at (a ``stat`` of a local Zarr store's ``zarr.json``, ~1 us), see whether another
        writer replaced the group (``_follow_other_writers``). A growth by another writer's append
        changes the file too, not the data version: nothing is forgotten then."""
        now = self._arrays.metadata_token(self.values_path)
        if now is not None and now != self._caches.tokens.get(self.path, now):
            self._follow_other_writers()
        self._caches.tokens[self.path] = now

    def _follow_other_writers(self) -> None:
        """Before done flags are read anew: where another writer gave the group a new data version
        (it created the set again, perhaps with another dtype, shape or chunking, or rewrote done
        rows), forget its arrays' metadata, maps and cached chunks, so that nothing of the new files
        is read through what was known of the old ones (bytes of float32 read as float16: garbage,
        with every checksum passing). ``_consistent`` starts a read in flight again."""
        known = self._caches.versions.get(self.path, _UNREAD)
        token = self._arrays.metadata_token(self.values_path)
        try:
            now = self._arrays.read_attr(self.path, DATA_VERSION)
        except (KeyError, FileNotFoundError):  # deleted since: say so, as a fresh open would
            self._arrays.forget(self.path)
            self._caches.forget(self.path)
            raise UnknownFeatureError(self.kind.noun, self.name,
                                      self._arrays.groups_with(self.kind.top, self.kind.leaf)) from None
        if known is not _UNREAD and now != known:
            self._arrays.forget(self.path)
            self._caches.forget(self.path)
            self._caches.replaced[self.path] = self._caches.replaced.get(self.path, 0) + 1
        self._caches.versions[self.path], self._caches.tokens[self.path] = now, token

    def _consistent(self, read: Callable[..., _T], *args: Any) -> _T:
        """``read(*args)``, started again where another writer's replacement of the group was seen
        during it or just after it (its first part used the old metadata: its result, or its
        error, is not the store's). The metadata is looked at after a read that met files anew
        (``StoreArrays.fresh_reads``: a zarr read, a shard file mapped), so bytes read before a
        replacement finished are never taken for the new set's; a read served by shards mapped
        before reads what they held (the old set's values, consistently, until ``refresh``). The
        common case costs two counter lookups before and after; a fresh read, a ``stat`` more."""
        replaced, arrays, path = self._caches.replaced, self._arrays, self.path
        for _ in range(_REPLACED_TRIES):
            seen, reads = replaced.get(path, 0), arrays.fresh_reads()
            try:
                out = read(*args)
            except Exception:
                self._check_metadata()
                if replaced.get(path, 0) == seen:
                    raise
                self._caches.forget(path)  # what the attempt cached through the old metadata
                continue
            if arrays.fresh_reads() != reads:
                self._check_metadata()
            if replaced.get(path, 0) == seen:
                return out
            self._caches.forget(path)
        raise StoreChangedError(f"{self._arrays.location}:{self.path}: replaced by another writer on each of "
                                f"{_REPLACED_TRIES} reads in a row; read it again when that writer is done")

    def _known_done(self, row: int) -> bool:
        """Whether the done flags already read say ``row`` is finished (False: unknown or not)."""
        mask = self._caches.done.get(self.path)
        if mask is not None:
            return bool(mask[row])
        per = self._per()[1]
        flags = self._caches.done_chunks.get(self.path, {}).get(row - row % per)
        return flags is not None and bool(flags[row % per])

    def set_done(self, start: int, flags: np.ndarray) -> None:
        """Write done flags for rows ``start:start+len(flags)`` and keep the cached mask in step
        (the callers move the data version where done rows are left not done: ``_rewriting``)."""
        self._arrays.write(self.done_path, start, flags)
        self._caches.done_chunks.pop(self.path, None)
        mask = self._caches.done.get(self.path)
        if mask is not None:
            mask[start:start + len(flags)] = flags

    def require_done(self, rows: np.ndarray) -> None:
        """Raise ``MissingFeatureError`` naming the clips of ``rows`` that are not finished."""
        mask = self._caches.done.get(self.path)
        if len(rows) == 1 and mask is not None:  # a single get, the mask read: one flag, no array
            if mask[int(rows[0])]:
                return
            flags = mask[rows]
        elif len(rows) == 1:  # a cold single get: its done chunk only
            per, row = self._per()[1], int(rows[0])
            start = row - row % per
            flags = self._done_rows(start, min(self._index.n_clips, start + per))[row - start:row - start + 1]
        else:
            flags = self._done()[rows]
        if len(rows) and not flags.all():
            mask = self._done(refresh=True)  # another process may have written since
            missing = rows[~mask[rows]]
            if len(missing):
                raise MissingFeatureError(self.kind.missing_label.format(name=self.name), self._index.ids_at(missing),
                                          self.kind.noun)

    def error_texts(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Error texts of rows ``start:stop`` ('' where a row has none; all '' without an errors array)."""
        stop = self._index.n_clips if stop is None else stop
        if not self.kind.with_errors:
            return np.full(stop - start, "", dtype=str)
        return self._arrays.read(self.errors_path, start, stop, written=False)

    def failed_rows(self, done: np.ndarray | None = None) -> dict[int, str]:
        """Row -> error text of every failed row, reading only the error chunks that can hold one.

        A row that has an error is never done (``write_rows`` clears the text of a row it marks done,
        ``set_errors`` marks its rows not done), so only chunks with rows not done are read, and of
        those only the chunks in storage (a chunk never written holds no error). On a finished
        feature set of a million clips that is no chunk at all, where decoding every text took
        seconds. ``done``: the done mask when the caller has it.
        """
        if not self.kind.with_errors:
            return {}
        open_rows = np.flatnonzero(~(self._done() if done is None else np.asarray(done, dtype=bool)))
        per = self._arrays.chunk_rows(self.errors_path)
        failed: dict[int, str] = {}
        chunks = open_rows // per  # ascending, as the rows are: the distinct ones without a sort
        for chunk in chunks[np.flatnonzero(np.diff(chunks, prepend=-1))]:
            if not self._arrays.chunk_written(self.errors_path, int(chunk)):
                continue
            start = int(chunk) * per
            texts = self.error_texts(start, min(self._index.n_clips, start + per))
            for offset in np.flatnonzero(texts != ""):
                failed[start + int(offset)] = str(texts[offset])
        return failed

    def _errors_stored(self, start: int, stop: int) -> bool:
        """Whether an error-text chunk holding any of rows ``start:stop`` is in storage. Where none is,
        a block of done rows has no text to clear (an absent chunk reads as no error, as ``failed_rows``
        and ``verify`` take it), so none is written: a chunk of empty texts per shard was 123 files and
        ~0.05 s of a million-clip fill, and a PUT each on object storage."""
        per = self._arrays.chunk_rows(self.errors_path)
        return any(self._arrays.chunk_written(self.errors_path, chunk) for chunk in range(start // per, -(-stop // per)))

    def write_errors(self, start: int, texts: np.ndarray) -> None:
        """Write error texts for rows ``start:start+len(texts)`` (done flags are not touched)."""
        self._arrays.write(self.errors_path, start, np.asarray(texts, dtype=object))

    # ---------------------------------------------------------------------------------- writes
    def write_block(self, start: int, data: np.ndarray, changed: np.ndarray | None = None) -> None:
        """Write values of rows ``start:start+len(data)``; the block must cover whole chunks.

        Its end may be the last row. Parallel writers then never touch the same chunk (Zarr
        loses data when two do). Done flags are not touched: the caller sets them afterwards.
        ``changed`` (bool per row): the only rows whose stored bits may differ and matter (see
        ``Backend.write``): a partial commit of a shard then writes its changed inner chunks.
        """
        data = self._check_block(start, np.asarray(data))
        array = self.values_path
        try:
            self._arrays.write(array, start, data.astype(self._arrays.dtype(array), copy=False), changed=changed)
        finally:  # a failed write may have replaced some of the block's chunks
            self._caches.chunks.drop(array)

    def _check_block(self, start: int, data: np.ndarray) -> np.ndarray:
        """``data`` when it is a block of whole chunks of the value array's row shape, else ValueError."""
        array = self.values_path
        shape, rows = self._arrays.shape(array), self._arrays.chunk_rows(array)
        stop = start + len(data)
        if data.shape[1:] != tuple(shape[1:]):
            raise ValueError(f"{array}: rows have shape {tuple(data.shape[1:])}, expected {tuple(shape[1:])}")
        if start < 0 or stop > shape[0] or len(data) == 0:
            raise ValueError(f"{array}: rows {start}:{stop} are outside 0:{shape[0]} or empty")
        if stop > self._index.n_clips:  # rows an unfinished append grew the arrays by: no clip owns them yet
            raise ValueError(f"{array}: rows {start}:{stop} go past the store's {self._index.n_clips} clips "
                             f"(rows an append that did not finish left; the next writable open removes them)")
        if start % rows or (stop % rows and stop != shape[0]):
            raise ValueError(f"{array}: block {start}:{stop} is not aligned to whole chunks of {rows} "
                             f"rows (parallel writers must own whole chunks)")
        _check_storable(array, data, np.dtype(self._arrays.dtype(array)))
        return data

    def write_rows(self, start: int, data: np.ndarray, done: np.ndarray | None = None,
                   errors: dict[int, str] | None = None, unchanged: np.ndarray | None = None) -> None:
        """Write a block of whole chunks, then its error texts, then its done flags.

        ``done`` (bool per row of the block, default all True) says which rows are finished;
        ``errors`` (absolute row -> message) records the failures of this block. Rows neither done
        nor in ``errors`` keep their done flag false and their earlier error text; a done row's
        earlier error is cleared. A writer killed in between never leaves a row marked done whose
        values are not there. ``unchanged`` (bool per row of the block, default none): rows whose
        values the caller read from this group for this write (an extraction keeping the rows it
        finished earlier); they are not read a second time to tell whether the data version changes,
        and with ``unchanged`` given only the other done rows are written (``write_block``'s ``changed``).
        """
        if not is_int(start):
            raise TypeError(f"{self.path}: start is a row number, got the {type(start).__name__} {start!r}")
        stop = start + len(data)
        done = np.ones(len(data), dtype=bool) if done is None else np.asarray(done, dtype=bool)
        if done.shape != (len(data),):
            raise ValueError(f"{self.path}: done mask has shape {done.shape}, expected ({len(data)},)")
        if unchanged is not None:
            unchanged = np.asarray(unchanged, dtype=bool)
            if unchanged.shape != (len(data),):
                raise ValueError(f"{self.path}: unchanged mask has shape {unchanged.shape}, "
                                 f"expected ({len(data)},)")
        bad_keys = [row for row in (errors or {}) if not is_int(row)]
        if bad_keys:
            raise ValueError(f"{self.path}: errors are keyed by row number, got {bad_keys[0]!r} "
                             f"(set_errors takes clip ids)")
        errors = {int(row): str(msg) for row, msg in (errors or {}).items()}
        bad = [row for row in errors if not start <= row < stop or done[row - start]]
        if bad:
            raise ValueError(f"{self.path}: error rows {bad[:5]} are outside the block {start}:{stop} "
                             f"or also marked done")
        data = self._check_block(start, np.asarray(data))
        with self._version_moves(self._rewriting(np.arange(start, stop), data, unchanged, done)):
            # rows taken from the store are stored already, rows not done are never served: only the
            # others need writing (a partial commit: the rows done since the last one)
            self.write_block(start, data, changed=None if unchanged is None else done & ~unchanged)
            if self.kind.with_errors:
                self._write_block_errors(start, stop, done, errors)
            self.set_done(start, done)

    def _write_block_errors(self, start: int, stop: int, done: np.ndarray, errors: dict[int, str]) -> None:
        """The error texts of rows ``start:stop`` after a write: cleared for done rows, ``errors`` set."""
        if done.all() and not errors:
            if self._errors_stored(start, stop):  # texts of earlier failures to clear
                self.write_errors(start, np.full(stop - start, "", dtype=object))
            return
        texts = self.error_texts(start, stop).astype(object)
        texts[done] = ""
        for row, message in errors.items():
            texts[row - start] = error_text(message)
        self.write_errors(start, texts)

    def set_errors(self, errors: dict[int, str]) -> None:
        """Record failures (row -> message); those rows are marked not done."""
        rows = np.fromiter(errors, dtype=np.int64, count=len(errors))
        with self._version_moves(self._rewriting(rows, done=np.zeros(len(rows), dtype=bool))):
            for row, message in errors.items():
                self.write_errors(row, np.array([error_text(message)], dtype=object))
                self.set_done(row, np.zeros(1, dtype=bool))

    def write_scattered(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Write values of any rows (in any order; one writer per group), then mark them done.

        Each run of consecutive rows is one write followed by its done flags.
        """
        order = np.argsort(rows)
        rows, values = rows[order], values[order]
        with self._version_moves(self._rewriting(rows)):
            for part in np.split(np.arange(len(rows)), np.flatnonzero(np.diff(rows) != 1) + 1):
                if len(part):
                    start = int(rows[part[0]])
                    self._arrays.write(self.values_path, start, values[part])
                    self.set_done(start, np.ones(len(part), dtype=bool))
            self._caches.chunks.drop(self.values_path)

    # ----------------------------------------------------------------------------------- reads
    def gather(self, rows: np.ndarray, check_done: bool = True) -> np.ndarray:
        """Values of ``rows`` in the given order; each chunk is read and decoded once.

        Scattered rows are read from memory-mapped shards where the backend can (local, uncompressed
        shards: numpy fancy indexing plus a crc32c per inner chunk touched), else by inner chunk (a
        sharded array's small unit: a random read decodes a few clips, not a whole shard); a run of
        rows covering at least half a chunk is read by whole chunks (one read per shard, cached
        whole, as loaders walking blocks want).
        ``check_done``: refuse rows that are not finished (``MissingFeatureError``).
        A group replaced by another writer meanwhile is read as it is now (``_consistent``).
        """
        return self._consistent(self._gather, rows, check_done)

    def _gather(self, rows: np.ndarray, check_done: bool) -> np.ndarray:
        if check_done:
            self.require_done(rows)
        array = self.values_path
        shape = self._arrays.shape(array)
        out = np.empty((len(rows),) + tuple(shape[1:]), dtype=self._arrays.dtype(array))
        if not len(rows):
            return out
        per = self._arrays.inner_rows(array)
        whole = self._arrays.chunk_rows(array)
        if per < whole and 2 * len(rows) >= whole and _is_run(rows):
            per = whole
        elif len(rows) > 1:  # scattered rows: memory-mapped shards where the backend has them
            required = np.ones(len(rows), dtype=bool) if check_done else self._done()[rows]
            fast = self._arrays.gather(array, rows, required)
            if fast is not None:
                return fast
        chunk_of = rows // per
        order = np.argsort(chunk_of, kind="stable")
        ordered = chunk_of[order]
        starts = np.r_[0, np.flatnonzero(np.diff(ordered)) + 1]
        ends = np.r_[starts[1:], len(order)]
        local = rows[order] - ordered * per  # each row's place in its block, in block order
        starts, ends = starts.tolist(), ends.tolist()
        blocks = self._blocks(ordered[starts], per, shape[0], [local[a:b] for a, b in zip(starts, ends)])
        for block, a, b in zip(blocks, starts, ends):
            out[order[a:b]] = block[local[a:b]]
        return out

    def cached_row(self, row: int) -> np.ndarray | None:
        """Values of a finished row held by the decoded-chunk cache, ``[...]`` (a view: copy it), or
        None. The warm ``get``: two dict lookups and a slice, nothing read."""
        per = self._per()[0]
        chunk, offset = divmod(row, per)
        hit = self._caches.chunks.get((self.values_path, per, chunk))
        if hit is None or offset >= len(hit[1]) or not hit[1][offset] or not self._known_done(row):
            return None
        return hit[0][offset]

    def read_row(self, row: int) -> np.ndarray:
        """Values of one finished row, ``[...]``, as a view of the decoded-chunk cache (copy it); a row not finished
        raises ``MissingFeatureError`` (as ``require_done``).

        A row of an inner chunk in the decoded-chunk cache is a slice of it. Otherwise the chunk's
        done flags are read first (a row done now was written), then the chunk: from its shard's
        map where the backend has one, checked once per mapping. The first read of a chunk keeps
        only its row in the cache: the entry's block is that row repeated (stride 0, no memory for
        the others), with only its flag set, so no other row is served from it. A random read never
        uses its neighbours, and copying them into fresh memory cost ~5 us of page faults, a third
        of a cold ``get`` at a million clips. The clip asked again is a cache hit; a neighbour read
        next keeps the chunk whole."""
        return self._consistent(self._read_row, row)

    def _read_row(self, row: int) -> np.ndarray:
        array = self.values_path
        per = self._per()[0]
        chunk, offset = divmod(row, per)
        key = (array, per, chunk)
        hit = self._caches.chunks.get(key)  # the warm path: one lookup, one slice
        if hit is not None and offset < len(hit[1]) and hit[1][offset]:
            return hit[0][offset]
        start = chunk * per
        done = self._done_rows(start, start + per)  # the chunk's committed rows (the index's row count)
        if not done[offset]:
            self.require_done(np.array([row]))  # raises unless another process finished it since
            done = self._done_rows(start, start + per)
        view = self._arrays.chunk(array, chunk, True)  # a cold get: its inner chunk from the map
        if view is None:
            blocks = self._blocks(np.array([chunk]), per, self._arrays.shape(array)[0], [np.array([offset])])
            return blocks[0][offset]
        if hit is None:  # the chunk's first read: its row alone, repeated (stride 0) to the chunk's shape
            one = view[offset].copy()
            block = np.ndarray((len(done), *one.shape), one.dtype, one, 0, (0, *one.strides))
            kept = np.zeros(len(done), dtype=bool)
            kept[offset] = True
        else:  # a row of it was read before: the whole chunk
            block, kept = view[:len(done)].copy(), done.copy()
        self._caches.chunks.put(key, (block, kept))
        return block[offset]

    def _mapped_blocks(self, spans: list[tuple[int, int]], done: list[np.ndarray]) -> list[np.ndarray] | None:
        """Inner chunks (rows ``spans``) from memory-mapped shards, or None where the backend has none."""
        if len(spans) == 1:  # a cold single get
            block = self._arrays.gather(self.values_path, np.arange(*spans[0]), done[0])
            return None if block is None else [block]
        rows, ends = _split_rows(spans)
        whole = self._arrays.gather(self.values_path, rows, np.concatenate(done))
        return None if whole is None else np.split(whole, ends)

    def _blocks(self, numbers: np.ndarray, per: int, n_rows: int, offsets: list[np.ndarray]) -> list[np.ndarray]:
        """Decoded blocks ``numbers`` of ``per`` rows; from the cache when every row asked for
        (``offsets`` in each block) was done when it was read, the others read together (one
        request per run of adjacent inner chunks).

        Partly finished blocks are cached too (one failed clip would otherwise make its whole block
        be re-read on every get), together with the done flags seen when they were read: a row
        finished since, e.g. by another process, misses the cache and is never served stale.
        """
        array, cache = self.values_path, self._caches.chunks
        out: list[np.ndarray | None] = []
        misses: list[int] = []
        keys = [(array, per, number) for number in numbers.tolist()]
        for i, (hit, offset) in enumerate(zip(cache.get_many(keys), offsets)):
            if hit is not None and int(offset[-1] if len(offset) == 1 else offset.max()) < len(hit[1]) \
                    and bool(hit[1][offset].all()):
                out.append(hit[0])
            else:
                out.append(None)
                misses.append(i)
        if not misses:
            return out  # type: ignore[return-value]
        spans = [(int(numbers[i]) * per, min(n_rows, (int(numbers[i]) + 1) * per)) for i in misses]
        # done flags before data: a row done now was written. One cold row reads its own flags only
        mask = None if len(misses) == 1 else self._done()
        done = [self._done_rows(*spans[0]).copy()] if mask is None else [mask[lo:hi].copy() for lo, hi in spans]
        if per == self._arrays.inner_rows(array):
            blocks = self._mapped_blocks(spans, done)  # memory-mapped shards where the backend has them
            if blocks is None:
                required = np.array([flags.any() for flags in done])
                blocks = self._arrays.read_chunks(array, numbers[misses], required)
        else:
            blocks = [self._arrays.read(array, lo, hi, written=flags) for (lo, hi), flags in zip(spans, done)]
        cache.put_many([(keys[i], (block, flags)) for i, block, flags in zip(misses, blocks, done)])
        for i, block in zip(misses, blocks):
            out[i] = block
        return out  # type: ignore[return-value]


def _split_rows(spans: list[tuple[int, int]]) -> tuple[np.ndarray, list[int]]:
    """Every row of ``spans`` in order, and where each span ends in that list."""
    rows = np.concatenate([np.arange(lo, hi) for lo, hi in spans])
    return rows, np.cumsum([hi - lo for lo, hi in spans])[:-1].tolist()


def _is_run(rows: np.ndarray) -> bool:
    """Whether ``rows`` are consecutive and increasing (a block read, not a random gather)."""
    return len(rows) > 1 and int(rows[-1]) - int(rows[0]) == len(rows) - 1 and bool((np.diff(rows) == 1).all())


DATA_VERSION = "data_version"
_UNREAD = object()  # no data version read yet for a group
_REPLACED_TRIES = 3  # reads of a group that another writer keeps replacing, before giving up
_T = TypeVar("_T")
_PARTIAL_DONE_READS = 8  # reads of a few done rows per group before the whole mask is read and kept


def _new_version() -> str:
    return uuid.uuid4().hex


def error_text(message: object) -> str:
    """What is stored for a failed row: the message, cut to 500 characters, never empty, and
    encodable as UTF-8 (a file name that is not, which Python decodes with lone surrogates, is
    kept as its escapes: the store's vlen-utf8 and HDF5's strings refused it, failing the write).
    A NUL is kept as its escape too: texts are read back as numpy strings, which drop trailing NULs."""
    text = str(message)[:500].replace("\x00", "\\x00") or "error"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text
