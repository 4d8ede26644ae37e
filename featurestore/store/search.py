"""Search stored embeddings: the clips nearest to a clip or a vector, by cosine similarity.

A clip's search vector is the mean of its stored segment/frame embeddings, L2-normalised, so the
score is the cosine similarity of clip-level means. Only clips whose ``done`` flag is set take part.
The store layer searches vectors only: a sentence is embedded above it (`featurestore.text_query`),
so nothing here imports ``featurestore.encoders``. Several queries at once (a ``[q, dim]`` matrix or
a list of clip ids) are one matrix product (exact) or one faiss call, with one result per query.

Two methods answer the same question:

* ``exact`` (numpy): the clip matrix ``[n_done, dim]`` float32, built in one streaming pass over the
  store's chunks (``BLOCK_BYTES`` at a time) straight into a ``.npy`` file beside the store, which
  later processes memory-map (nothing is loaded whole). A query is one matrix product and a partial sort.
* ``faiss``: an inverted-file index (``IVF<nlist>,Flat``, inner product; ``Flat`` for small sets)
  trained and filled from that clip matrix (so building it reads the store once, like the matrix).
  The number of lists a query visits is calibrated at build time: the fewest that reach recall@10
  >= ``CALIBRATION_RECALL`` against exact answers for sample queries.

``auto`` searches exactly while ``n_done x dim`` stays at or below ``APPROX_ABOVE`` values (measured
here: a query over 24M float32 values takes about 40 ms on this loaded 2-core machine, so exact
search stays under ~50 ms), and with faiss above that; without faiss-cpu it stays exact and says so.

Both the matrix and the index are kept beside the store, in the sidecar directory
``<store path>.search/<feature set>/`` (the store itself is never written, so a read-only store can
be searched), under a key made of the feature set's fingerprint, its done mask and data version and
the method's parameters: a set that changes gets a new key and is rebuilt; older files of that set are
removed. Stores at URLs (``memory://``, ``s3://``) keep them in memory only. Within one process, a
store object keeps what it built (weakly), so a warm query is a matmul.

The sidecar files are caches, never trusted (`featurestore.store._search_files`):

* the clip matrix is a ``.npy`` file plus a small JSON manifest written after it; the manifest's
  name carries the sha256 of its bytes (checked on every open: it is a few KiB) and it holds the
  matrix file's size, shape and the crc32 of every 64 MiB block of its data. Opening checks the
  manifest, the size and the ``.npy`` header (cheap); the block crc32s and the unit length of every
  vector are checked once per file per process, before the first answer from it (about 1 GB/s: 0.1 s
  for the largest matrix ``auto`` searches exactly), remembered by the file's inode, size, mtime and ctime;
* the faiss index is one file named by its bytes' sha256. A flat index (small sets) is hashed whole
  before faiss decodes it. An IVF index also gets a ``.lists`` manifest (named by its own sha256)
  with the crc32 of the file's head and of each inverted list: a new process checks the head, has
  faiss map the file (its lists are not read), and checks each list when a query first probes it,
  so the first query at a million clips reads a few MiB of a 2 GiB file, not all of it;
* the faiss and ``.ids`` files end with a binding (key, feature set, data version, store) inside their
  hashed bytes, and the matrix's manifest holds its key: a sidecar of another store or set renamed to
  this key is refused (`_search_files.check_binding`);
* a query that yields a "cosine" outside [-1, 1] drops what it used (the last guard for an index
  whose memory went bad after its check).

Any of these is damage: one warning line, the files are removed and the index rebuilt from the store.
Directories are opened without following links: a symbolic link where a sidecar directory belongs
is never used (search answers from memory), and cleaning never deletes through a link. When the
sidecar cannot be written (a read-only directory, a full disk), search warns once and answers from memory.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from featurestore.atomic_files import describe_os_error
from featurestore.checks import is_int_in
from featurestore.store import _search_files as _files
from featurestore.store._search_files import SidecarDamage, SidecarDir

APPROX_ABOVE = 24_000_000  # auto: exact search up to this many n_done x dim values (~40 ms a query here), faiss above
BLOCK_BYTES = 64 * 2**20  # rows read per block while building the clip matrix (about this many bytes)
ID_BLOCK_ROWS = 65536  # result ids are decoded (and kept) this many rows at a time
# stores of more clips keep every id in a sidecar (.ids: fixed-width utf-8, row order) for the answers:
# decoding the 65,536-id blocks that ten answers fall in took 2-3 s of a first query at 1M clips
IDS_ABOVE = ID_BLOCK_ROWS
MAX_ID_BYTES = 256  # longer ids: no .ids sidecar (fixed width would make it too large)
SCORE_BLOCK_BYTES = 64 * 2**20  # a batch of queries is scored this many bytes of scores at a time
FLAT_BELOW = 4096  # fewer clips than this: a faiss index is a plain flat (exact) index
CALIBRATION_RECALL = 0.97  # the IVF index visits enough lists to reach this recall@10 on sample queries
CALIBRATION_QUERIES = 200
COSINE_TOLERANCE = 1e-3  # float32 rounding of unit vectors stays far below this; beyond it, a score is no cosine
METHODS = ("auto", "exact", "faiss")
SIDECAR_SUFFIX = ".search"

_MEMO: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_WARNED: contextvars.ContextVar[set | None] = contextvars.ContextVar("search_warned", default=None)


@dataclass
class SearchResult:
    """The ``k`` nearest clips of one query, best first.

    Attributes:
        clip_ids: clip ids, best first.
        scores: cosine similarities, ``[k]`` float32.
        labels: class names (None where the label is unknown).
        feature_set: the searched feature set.
        method: ``exact`` or ``faiss``.
        query: what was asked (``{"like": id}``, ``{"vector": dim}``, or ``{"text": ..., "encoder": spec}``
            for `featurestore.text_query.search_text`).
        random_weights: the feature set (or the text tower) has random weights: the neighbours mean nothing.
        notes: what the caller should know (a fallback, a freshly built index).
    """

    clip_ids: list[str]
    scores: np.ndarray
    labels: list[str | None]
    feature_set: str
    method: str
    query: dict
    random_weights: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (what ``featurestore search --json`` prints)."""
        return {"feature_set": self.feature_set, "method": self.method, "query": self.query,
                "random_weights": self.random_weights, "notes": list(self.notes),
                "results": [{"rank": i + 1, "clip_id": c, "score": float(s), "label": lab}
                            for i, (c, s, lab) in enumerate(zip(self.clip_ids, self.scores, self.labels))]}


# ------------------------------------------------------------------------------------ public API
def search(store: Any, feature_set: str, query: Any, k: int = 10, *, method: str = "auto",
           include_self: bool = False, nprobe: int | None = None) -> SearchResult | list[SearchResult]:
    """The ``k`` clips whose clip-level embeddings are nearest (cosine) to the query.

    Args:
        store: an open `FeatureStore`.
        feature_set: the embedding set to search (``[n_clips, n_segments, dim]``).
        query: a clip id in the store (search "more like this clip") or an embedding ``[dim]``: one
            `SearchResult`. A list of clip ids or a ``[q, dim]`` matrix of embeddings: a list of ``q``
            results, answered together (one matrix product, or one faiss call).
        k: how many clips to return per query (fewer when fewer clips are done).
        method: ``auto`` (exact up to ``APPROX_ABOVE`` ``n_done x dim`` values, else faiss),
            ``exact`` or ``faiss``.
        include_self: keep a query clip in its own results (default: left out).
        nprobe: faiss IVF lists visited per query (default: the number calibrated when the index was
            built to reach ``CALIBRATION_RECALL`` recall@10 on sample queries).

    Raises:
        UnknownFeatureError, UnknownClipError, MissingFeatureError (a query clip is not done),
        ValueError: bad ``k``/``nprobe``/method/query shape, a query vector that is all zeros or not
        finite, or a feature set that is not one vector per segment.
    """
    if method not in METHODS:
        raise ValueError(f"search method must be one of {', '.join(METHODS)}, got {method!r}")
    if not is_int_in(k, 1):  # int(2.7) would answer 2 clips, int(None) raise a bare TypeError
        raise ValueError(f"k must be a whole number of at least 1, got {k!r}")
    if nprobe is not None and not is_int_in(nprobe, 1):  # faiss takes it as a size_t: -1 is an OverflowError
        raise ValueError(f"nprobe must be a whole number of at least 1 (IVF lists visited per query), got {nprobe!r}")
    state = set_state(store, feature_set)  # raises UnknownFeatureError naming the stored sets
    info = state.info
    if len(info.feature_shape) != 1:
        raise ValueError(f"feature set {feature_set!r} holds {list(info.feature_shape)} arrays per segment; "
                         f"search needs one embedding vector per segment")
    batch = _is_batch(query)
    vectors, described, self_rows = query_vectors(store, info, query)
    notes: list[str] = []
    method = _choose_method(info, method, notes)
    excludes = [None if include_self else row for row in self_rows]
    token = _WARNED.set(set())
    try:
        try:
            answers = _top_k(store, feature_set, state.key(method), method, vectors, int(k), excludes, nprobe,
                             notes, reuse=True)
        except SidecarDamage as damage:  # an index gave a "cosine" outside [-1, 1]: never served
            _warn(f"the {method} search index of {feature_set!r} {damage}; rebuilding it from the store")
            answers = _top_k(store, feature_set, state.key(method), method, vectors, int(k), excludes, nprobe,
                             notes, reuse=False)
    finally:
        _WARNED.reset(token)
    every = np.concatenate([rows for rows, _ in answers]) if answers else np.empty(0, dtype=np.int64)
    ids = iter(state.ids_of(store, every))
    labels, classes = state.labels, state.classes
    results = [SearchResult([next(ids) for _ in rows], scores.astype(np.float32),
                            [classes[labels[r]] if labels[r] >= 0 else None for r in rows],
                            feature_set, method, asked, info.random_weights, list(notes))
               for (rows, scores), asked in zip(answers, described)]
    return results if batch else results[0]


def clip_vectors(segments: np.ndarray) -> np.ndarray:
    """Clip-level search vectors: the mean over segments, L2-normalised (float32).

    A float64 set's mean is taken in float64 (its values need not fit float32), others' in float32.

    Args:
        segments: ``[n, n_segments, dim]`` (or ``[n_segments, dim]`` for one clip).
    """
    x = np.asarray(segments)
    x = x.astype(np.float64 if x.dtype == np.float64 else np.float32, copy=False)
    return unit_rows(x.mean(axis=-2))


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` divided by their length, as float32: a row of zeros stays zero, a row holding NaN
    or inf gives NaN (callers leave those out or refuse them). ``x`` is float32 or float64 and may be
    changed in place.

    A row whose length is not a normal number (its squares overflowed: float32 values above ~1e19;
    or underflowed: below ~1e-19) is first divided by its largest magnitude (``_scaled_unit``): a
    cosine does not depend on the scale, so neither may the answer (``x / inf`` was a zero vector,
    scoring 0 against every clip). Only such rows pay for it: a float16 set's never do.
    """
    rows = x.reshape(-1, x.shape[-1]) if x.ndim != 2 else x
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        norm = np.linalg.norm(rows, axis=1, keepdims=True)
        odd = ~(np.isfinite(norm[:, 0]) & (norm[:, 0] > _NORMAL_LENGTH))
        if odd.any():
            rows[odd] = _scaled_unit(rows[odd])
            norm[odd] = 1
        rows /= norm
    return x.astype(np.float32, copy=False)


#: a row at least this long has squares well inside float32's normal range (its length is exact)
_NORMAL_LENGTH = 1e-15


def _scaled_unit(rows: np.ndarray) -> np.ndarray:
    """``rows`` (2-d) divided by their largest magnitude, then by their length (1 or more, or 0 for
    a row of zeros, which stays zero; NaN for a row holding NaN or inf)."""
    scale = np.abs(rows).max(axis=1, keepdims=True)
    rows = rows / np.where(scale > 0, scale, 1)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1)


def _top_k(store: Any, feature_set: str, key: str, method: str, vectors: np.ndarray, k: int,
           excludes: list[int | None], nprobe: int | None, notes: list[str],
           reuse: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rows and scores of the ``k`` best per query; ``reuse=False`` builds the index anew from the store.
    ``key`` is the set's key for ``method``, worked out once per query by the caller."""
    if method == "exact":
        return clip_matrix(store, feature_set, notes, reuse=reuse, key=key).top_k(vectors, k, excludes)
    return faiss_index(store, feature_set, notes, reuse=reuse, key=key).top_k(vectors, k, excludes, nprobe)


def check_cosines(scores: np.ndarray) -> None:
    """Raise `SidecarDamage` when a score cannot be a cosine of unit vectors (outside [-1, 1], NaN).

    Unit query and clip vectors give cosines within float32 rounding of [-1, 1]; anything else
    means the index that produced them holds other numbers than the ones built (a flipped bit).
    """
    if scores.size:
        worst = max(float(scores.max()), -float(scores.min()))  # NaN stays NaN; no temporary array
        if not worst <= 1 + COSINE_TOLERANCE:
            raise SidecarDamage(f"gave a cosine of {worst:.3g}, outside [-1, 1]")


# ------------------------------------------------------------------------------------- queries
def _is_batch(query: Any) -> bool:
    """A list/tuple of clip ids or a 2-D array: several queries (a list of results)."""
    if isinstance(query, (list, tuple)):
        return bool(query) and all(isinstance(q, str) for q in query) or np.ndim(query) == 2
    return not isinstance(query, str) and np.ndim(query) == 2


def query_vectors(store: Any, info: Any, query: Any) -> tuple[np.ndarray, list[dict], list[int | None]]:
    """(unit query vectors ``[q, dim]``, what each asked, each query clip's row or None).

    Raises:
        ValueError: an empty or misshapen query, a vector that is all zeros or holds NaN/inf (it has
            no direction, so no cosine), or a query clip whose stored values are so.
    """
    dim = info.feature_shape[0]
    ids = [query] if isinstance(query, str) else query if isinstance(query, (list, tuple)) and query and all(
        isinstance(q, str) for q in query) else None
    if ids is not None:
        rows = [store.row(q) for q in ids]  # UnknownClipError with the nearest ids
        vectors = clip_vectors(store.get_many(info.name, list(ids)))  # MissingFeatureError when not done
        _check_vectors(vectors, lambda i: f"clip {ids[i]!r} in feature set {info.name!r}")
        return vectors, [{"like": q} for q in ids], rows
    if query is None or isinstance(query, (list, tuple)) and not query:
        raise ValueError("give a query: a clip id, a list of clip ids, an embedding [dim] or a matrix [q, dim]")
    if np.iscomplexobj(query):  # numpy would drop the imaginary parts with a warning, answering another query
        raise ValueError("the query embedding holds complex numbers; give real ones")
    try:
        x = np.asarray(query)
        x = x.astype(_working_dtype(x.dtype))  # a copy: unit_rows works in place, the caller's array stays as it is
    except (ValueError, TypeError) as err:  # ["c001", 2.0], an array of ids: numpy's own line named no query
        raise ValueError(f"the query must be a clip id, a list of clip ids, or numbers (an embedding [dim] or "
                         f"[q, dim]); it holds something else ({err})") from None
    if x.ndim not in (1, 2) or x.shape[-1] != dim or not x.size:
        raise ValueError(f"the query embedding has shape {list(x.shape)}; the feature set's embeddings have {dim} "
                         f"values: give [{dim}] or [q, {dim}]")
    x = x.reshape(-1, dim)
    _check_vectors(x, lambda i: "the query embedding" if len(x) == 1 else f"query {i + 1} of {len(x)}")
    return unit_rows(x), [{"vector": dim}] * len(x), [None] * len(x)


def _working_dtype(dtype: np.dtype) -> type:
    """float32 for queries that fit it (float16/32, integers, bool: every such value is a finite
    float32), so a float32 batch is normalised with the arithmetic of the float32 index and never
    copied to float64 (twice its size); float64 for the rest (Python floats, float64, object): a
    query of 1e200s has a direction too, and `unit_rows` scales it before normalising."""
    fits = dtype.kind in "biu" or (dtype.kind == "f" and dtype.itemsize <= 4)
    return np.float32 if fits else np.float64


def _check_vectors(x: np.ndarray, what: Callable[[int], str]) -> None:
    """A ValueError naming (``what(row)``: made only for the row refused) the first row of ``x`` that
    is not finite or all zeros (no cosine)."""
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        raise ValueError(f"{what(int(np.argmin(finite)))} holds non-finite values (NaN or inf): it has no cosine "
                         f"to search by")
    nonzero = (x != 0).any(axis=1)  # not a norm: the square of 1e-30 is 0 in float32, of 1e20 inf
    if not nonzero.all():
        raise ValueError(f"{what(int(np.argmin(nonzero)))} is all zeros: it has no direction, so no cosine "
                         f"to search by")


def _top_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` largest scores, best first (ties in position order)."""
    k = min(k, len(scores))
    top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    return top[np.argsort(-scores[top], kind="stable")]


# ------------------------------------------------------------------------------- the clip matrix
@dataclass
class ClipMatrix:
    """Unit clip vectors of the done clips: ``matrix[i]`` belongs to store row ``rows[i]`` (rows increase).

    ``matrix`` is a memory map of the sidecar ``.npy`` when there is one, else an array in memory.
    """

    key: str
    rows: np.ndarray
    matrix: np.ndarray

    def top_k(self, vectors: np.ndarray, k: int, excludes: list[int | None] | None = None,
              ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Rows and cosines of the ``k`` best per query row of ``vectors`` ``[q, dim]``; `SidecarDamage`
        when a score is no cosine (checked on all scores: one pass next to the ``n x dim`` product).

        Queries are scored a block at a time (``SCORE_BLOCK_BYTES`` of scores), so a large batch
        over a large matrix never holds ``q x n`` floats.
        """
        excludes = excludes or [None] * len(vectors)
        n = len(self.rows)
        step = max(1, SCORE_BLOCK_BYTES // max(1, 4 * n))
        out = []
        for start in range(0, len(vectors), step):
            block = vectors[start:start + step]
            # one query: a matrix-vector product (numpy's `matrix @ vector`), not a 1-row matrix product
            scores = (self.matrix @ block[0])[None] if len(block) == 1 else block @ self.matrix.T
            check_cosines(scores)
            for row_scores, exclude in zip(scores, excludes[start:start + step]):
                out.append(self._best(row_scores, k, exclude))
        return out

    def _best(self, scores: np.ndarray, k: int, exclude: int | None) -> tuple[np.ndarray, np.ndarray]:
        if exclude is not None:
            at = int(np.searchsorted(self.rows, exclude))
            if at < len(self.rows) and self.rows[at] == exclude:
                scores[at] = -np.inf
                k = min(k, len(scores) - 1)
        if k <= 0 or not len(scores):
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        top = _top_rows(scores, k)
        return self.rows[top], scores[top]


def clip_matrix(store: Any, feature_set: str, notes: list[str] | None = None, *, reuse: bool = True,
                key: str | None = None) -> ClipMatrix:
    """The clip matrix of a feature set: from this process's memo, the sidecar files (memory-mapped),
    or built now in one streaming pass (always built when ``reuse`` is False). ``key``: the set's
    exact-search key when the caller has it (`SetState.key`)."""
    key = key or set_key(store, feature_set, "exact")
    memo = _MEMO.setdefault(store, {})
    held = memo.get(("exact", feature_set))
    if reuse and held is not None and held.key == key:
        return held
    with _sidecar_folder(store, feature_set) as folder:
        built = _load_matrix(folder, store, feature_set, key) if reuse else None
        if built is None:
            t0 = time.perf_counter()
            built, saved = _build_matrix(folder, store, feature_set, key, notes)
            _note(notes, f"built the clip matrix of {feature_set!r} ({len(built.rows)} clips) in "
                         f"{time.perf_counter() - t0:.2f} s" + (f"; saved to {folder.path / saved}" if saved else ""))
    memo[("exact", feature_set)] = built
    return built


def _build_matrix(folder: SidecarDir | None, store: Any, feature_set: str, key: str,
                  notes: list[str] | None) -> tuple[ClipMatrix, str | None]:
    """The clip matrix, streamed into the sidecar ``.npy`` (then memory-mapped), or in memory when
    there is no sidecar directory or it cannot be written (one warning); (matrix, manifest name or None)."""
    done = store.done_mask(feature_set)
    dim = set_state(store, feature_set).info.feature_shape[0]
    if folder is not None:
        kept: list[np.ndarray] = []

        def vectors() -> Iterator[np.ndarray]:
            for block_rows, block in clip_blocks(store, feature_set):
                kept.append(block_rows)
                yield block

        try:
            name, matrix = _files.write_matrix(folder, key, int(done.sum()), dim, vectors(),
                                               lambda: _left_out(done, kept))
        except OSError as err:
            _warn(f"could not keep the search index in {folder.path}: {describe_os_error(err)}; searching in memory")
        else:
            rows = np.concatenate(kept) if kept else np.empty(0, dtype=np.int64)
            _note_not_finite(store, done, rows, notes)
            _files.remove_others(folder, ".npy", _files.manifest_matrix_name(name))
            _files.remove_others(folder, ".json", name)
            return ClipMatrix(key, rows, matrix), name
    rows, matrix = _matrix_in_memory(store, feature_set, notes)
    return ClipMatrix(key, rows, matrix), None


def _left_out(done: np.ndarray, kept: list[np.ndarray]) -> list[int]:
    return [int(r) for r in _not_in(done, np.concatenate(kept) if kept else np.empty(0, dtype=np.int64))]


def _not_in(done: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Done rows that are not in ``rows`` (a mask: ``np.setdiff1d`` hashes, 0.5 s at 200k rows)."""
    left = done.copy()
    left[rows] = False
    return np.flatnonzero(left)


def _matrix_in_memory(store: Any, feature_set: str, notes: list[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """Rows and unit clip vectors of every done clip with finite values, ``[n, dim]`` float32."""
    info = set_state(store, feature_set).info
    done = store.done_mask(feature_set)
    matrix = np.empty((int(done.sum()), info.feature_shape[0]), dtype=np.float32)
    rows, filled = [], 0
    for block_rows, vectors in clip_blocks(store, feature_set):
        matrix[filled:filled + len(vectors)] = vectors
        filled += len(vectors)
        rows.append(block_rows)
    rows = np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)
    _note_not_finite(store, done, rows, notes)
    return rows, matrix[:filled]


def clip_blocks(store: Any, feature_set: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(rows, unit clip vectors)`` of the done clips, reading whole chunks of about ``BLOCK_BYTES``.

    Clips whose vector is not finite (NaN or inf in the stored values) are left out: they have no
    cosine, and an index holding them could not be told from a damaged one.
    """
    info = set_state(store, feature_set).info
    done = store.done_mask(feature_set)
    row_bytes = max(1, int(np.prod(info.shape[1:])) * np.dtype(info.dtype).itemsize)
    block = max(1, BLOCK_BYTES // row_bytes // info.chunk_clips) * info.chunk_clips
    for start in range(0, store.n_clips, block):
        stop = min(store.n_clips, start + block)
        keep = done[start:stop]
        if keep.any():
            data = store.read_rows(feature_set, start, stop, check_done=False)[keep]
            vectors = clip_vectors(data)
            finite = np.isfinite(vectors).all(axis=1)
            yield (start + np.flatnonzero(keep))[finite], vectors[finite]


def _note_not_finite(store: Any, done: np.ndarray, rows: np.ndarray, notes: list[str] | None) -> None:
    left = _not_in(done, rows)
    if len(left):
        ids = store.index.ids_at(left[:5])
        _note(notes, f"{len(left)} done clips hold non-finite values and are left out of the search: "
                     f"{', '.join(ids)}{', ...' if len(left) > 5 else ''}")


def _load_matrix(folder: SidecarDir | None, store: Any, feature_set: str, key: str) -> ClipMatrix | None:
    """The checked, memory-mapped clip matrix of ``key``; None when there is none that is whole.

    Damage (a manifest other than its name's sha256, a matrix file of another size or header, a block
    whose crc32 differs, vectors that are not unit vectors, rows that are not done store rows) removes
    both files with one warning line.
    """
    if folder is None:
        return None
    done = store.done_mask(feature_set)
    dim = set_state(store, feature_set).info.feature_shape[0]
    for name in _files.names(folder, key, ".json"):
        try:
            rows, matrix = _files.read_matrix(folder, name, done, dim)
            return ClipMatrix(key, rows, matrix)
        except SidecarDamage as damage:
            _warn(f"the search index {folder.path / name} is damaged: {damage}; rebuilding it")
            _files.remove(folder, name)
            _files.remove(folder, _files.manifest_matrix_name(name))
        except OSError:
            continue  # removed meanwhile by another search, or unreadable: build
    return None


# -------------------------------------------------------------------------------- the faiss index
@dataclass
class FaissIndex:
    """A faiss inner-product index over unit clip vectors; its ids are store rows."""

    key: str
    index: Any
    nlist: int
    lists: _files.CheckedLists | None = None  # loaded from a .lists manifest: lists checked on first probe

    @property
    def default_nprobe(self) -> int:
        """IVF lists visited per query: the value calibrated at build time (see `calibrate_nprobe`)."""
        return int(getattr(self.index, "nprobe", 1)) if self.nlist > 1 else 1

    def top_k(self, vectors: np.ndarray, k: int, excludes: list[int | None] | None = None,
              nprobe: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Rows and cosines of the ``k`` best per query row of ``vectors`` (one faiss call)."""
        excludes = excludes or [None] * len(vectors)
        want = min(k + any(e is not None for e in excludes), self.index.ntotal)
        if want <= 0:
            return [(np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)) for _ in excludes]
        params = None
        if self.nlist > 1 and nprobe:
            import faiss

            params = faiss.SearchParametersIVF(nprobe=int(nprobe))
        if self.lists is not None:  # the lists these queries probe, checked before faiss reads them
            queries = np.ascontiguousarray(vectors, dtype=np.float32)
            _, probed = self.index.quantizer.search(queries, min(self.nlist, int(nprobe or self.default_nprobe)))
            self.lists.check(self.index, np.unique(probed[probed >= 0]))
        scores, ids = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), want, params=params)
        check_cosines(scores[ids >= 0])
        out = []
        for row_scores, row_ids, exclude in zip(scores, ids, excludes):
            keep = (row_ids >= 0) & (row_ids != (-2 if exclude is None else exclude))
            out.append((row_ids[keep][:k].astype(np.int64), row_scores[keep][:k]))
        return out


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def faiss_index(store: Any, feature_set: str, notes: list[str] | None = None, *, reuse: bool = True,
                key: str | None = None) -> FaissIndex:
    """The faiss index of a feature set: from this process's memo, the sidecar file, or built now
    (always built when ``reuse`` is False). ``key``: the set's faiss key when the caller has it."""
    key = key or set_key(store, feature_set, "faiss")
    return _cached(store, feature_set, "faiss", key, lambda: build_faiss_index(store, feature_set, key, notes),
                   reuse, notes)


def nlist_for(n: int) -> int:
    """IVF lists for ``n`` clips: about ``2 * sqrt(n)``, at most ``n / 39`` (faiss wants 39 training
    points per list); 1 (a flat index) below ``FLAT_BELOW``.

    Training (k-means) costs about ``n_train x nlist``, the build's largest part; measured at 50k x 64
    clustered, 2 sqrt(n) lists train in 2.1 s against 4.9 s for 4 sqrt(n), at the same calibrated
    nprobe (8) and query time (0.12 ms)."""
    return 1 if n < FLAT_BELOW else max(1, min(int(2 * np.sqrt(n)), n // 39))


def build_faiss_index(store: Any, feature_set: str, key: str = "", notes: list[str] | None = None) -> FaissIndex:
    """Train and fill an ``IVF<nlist>,Flat`` inner-product index (``Flat`` below ``FLAT_BELOW`` clips;
    ``nlist`` from `nlist_for`).

    Everything comes from the clip matrix (`clip_matrix`: the memory-mapped sidecar, built in one
    streaming pass when missing), so the store is read at most once: training uses at most 64
    random clip vectors per list, the vectors are added ``BLOCK_BYTES`` at a time, and the exact
    answers of the nprobe calibration are matrix products over the same map.
    """
    import faiss

    held = clip_matrix(store, feature_set, notes)
    dim, n = held.matrix.shape[1], len(held.rows)
    nlist = nlist_for(n)
    if nlist == 1:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    else:
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        pick = np.sort(np.random.default_rng(0).choice(n, size=min(n, 64 * nlist), replace=False))
        index.train(np.ascontiguousarray(held.matrix[pick]))
    step = max(1, BLOCK_BYTES // (4 * max(1, dim)))
    for start in range(0, n, step):
        index.add_with_ids(np.ascontiguousarray(held.matrix[start:start + step]), held.rows[start:start + step])
    if nlist > 1:
        spread = np.linspace(0, n - 1, min(n, CALIBRATION_QUERIES)).astype(int)
        index.nprobe = calibrate_nprobe(index, held, np.asarray(held.matrix[spread]), held.rows[spread])
    return FaissIndex(key, index, nlist)


def calibrate_nprobe(index: Any, held: ClipMatrix, queries: np.ndarray, query_rows: np.ndarray, k: int = 10) -> int:
    """The fewest IVF lists (8, 16, 32, ... nlist) whose recall@k reaches ``CALIBRATION_RECALL``.

    ``queries`` are stored clips (rows ``query_rows``), searched the way ``--like`` does: the clip
    itself left out of both answers; the exact answers are products with the clip matrix ``held``.

    How many lists are needed depends on the data: clustered embeddings (real ones) need few,
    embeddings spread evenly over the sphere need nearly all of them (the benchmark shows both);
    calibrating keeps the recall promise either way and records the speed it costs in the index
    (faiss saves ``nprobe``).
    """
    exact = [set(rows.tolist()) for rows, _ in held.top_k(queries, k, list(query_rows))]
    nlist = int(faiss_nlist(index))
    nprobe = min(8, nlist)
    while True:
        index.nprobe = nprobe
        _, found = index.search(queries, k + 1)
        recall = np.mean([len(_others(a, q, k) & b) / k for a, b, q in zip(found, exact, query_rows)])
        if recall >= CALIBRATION_RECALL or nprobe >= nlist:
            return nprobe
        nprobe = min(nlist, nprobe * 2)


def _others(rows: np.ndarray, own: int, k: int) -> set[int]:
    return set([int(r) for r in rows if r != own][:k])


def faiss_nlist(index: Any) -> int:
    """The IVF lists of ``index`` (1 for a flat one)."""
    import faiss

    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:
        return 1


# ------------------------------------------------------------------------- keys and the sidecar
@dataclass
class SetState:
    """What a search needs to know about a feature set, kept while its done mask stays the same.

    Reading ``feature_info`` and the label column costs milliseconds (a third of a second at a
    million clips: they are read from the store every time), so search reads them once per state
    (the sidecar loaders and builders take ``info`` from here too); the done mask is cached by the
    store until ``store.refresh()``, so hashing it is the cheap test of "has this set changed" that
    keeps a warm query a matrix product.
    """

    done_key: str
    info: Any
    labels: np.ndarray
    classes: list[str]
    origin: dict[str, str]  # what sidecar files are bound to (`_search_files.check_binding`): set, version, store
    id_blocks: dict[int, list[str]] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # method -> key, worked out once per state
    id_file: Any = False  # the .ids sidecar's ids (bytes, row order); None: none; False: not looked for

    def ids_of(self, store: Any, rows: np.ndarray) -> list[str]:
        """Clip ids of ``rows``: from the ``.ids`` sidecar of a store of more than ``IDS_ABOVE`` clips
        (`id_file`), else decoding aligned blocks of ``ID_BLOCK_ROWS`` ids once each (kept while
        the set is unchanged): the id column is never decoded whole for a query, and a warm query
        whose answers fall in blocks read before decodes nothing."""
        if self.id_file is False:
            self.id_file = id_file(store, self.info.name, self.key("ids"))
        if self.id_file is not None:
            return [self.id_file[int(r)].decode("utf-8") for r in rows]
        for block in {int(r) // ID_BLOCK_ROWS for r in rows} - self.id_blocks.keys():
            start = block * ID_BLOCK_ROWS
            self.id_blocks[block] = store.index.ids_at(np.arange(start, min(store.n_clips, start + ID_BLOCK_ROWS)))
        return [self.id_blocks[int(r) // ID_BLOCK_ROWS][int(r) % ID_BLOCK_ROWS] for r in rows]

    def key(self, method: str) -> str:
        """What a built matrix/index depends on: the feature set's name, fingerprint, shape, done mask and
        data token (`set_state`), the method."""
        if method not in self.keys:
            text = json.dumps([self.info.name, self.info.fingerprint, list(self.info.shape), method, FLAT_BELOW,
                               self.done_key])
            self.keys[method] = hashlib.sha256(text.encode()).hexdigest()[:16]
        return self.keys[method]


def set_state(store: Any, feature_set: str) -> SetState:
    """The feature set's `SetState`, rebuilt when its done mask or data version differs from the one
    it was made with (both are cached by the store until ``store.refresh()``).

    The data version is a random token made with the set, so it tells this store's set from any
    other's; a set written before versions existed has none, and the store's location stands in.
    """
    done = store.done_mask(feature_set)  # UnknownFeatureError for a bad name; cached by the store
    version = store.data_version(feature_set)  # changes when done rows are written again
    token = str(version) if version is not None else f"unversioned set of {store.location}"
    done_key = hashlib.sha256(np.packbits(done).tobytes() + f"{len(done)}/{token}".encode()).hexdigest()[:16]
    memo = _MEMO.setdefault(store, {})
    state = memo.get(("state", feature_set))
    if state is None or state.done_key != done_key:
        origin = {"feature_set": feature_set, "data_version": token, "store": str(store.location)}
        state = SetState(done_key, store.feature_info(feature_set), np.asarray(store.labels), store.classes, origin)
        memo[("state", feature_set)] = state
    return state


def id_file(store: Any, feature_set: str, key: str) -> np.ndarray | None:
    """The store's ids in row order (``[n_clips]`` bytes) from the ``.ids`` sidecar, written now from
    the id column when there is none (once per store: a few seconds at 1M clips, beside the minutes
    of building the index); None for stores of at most ``IDS_ABOVE`` clips, at URLs, or with ids that
    do not fit (longer than ``MAX_ID_BYTES`` bytes, or holding NUL).

    The file is named by its sha256, checked once per process (30 MB at 1M clips), and ends with its
    binding to the feature set and data version (`_search_files.check_binding`); a damaged one, or
    one of another store or set renamed to this key, is removed with one warning line and written again.
    """
    if store.n_clips <= IDS_ABOVE:
        return None
    with _sidecar_folder(store, feature_set) as folder:
        if folder is None:
            return None
        for name in _files.names(folder, key, ".ids"):
            try:
                most = store.n_clips * MAX_ID_BYTES + 4096 + _files.BIND_MAX_BYTES
                with _files.open_checked(folder, name, most) as f:
                    end = _files.check_binding(f, name, set_state(store, feature_set).origin)
                    return _files.read_ids(f, store.n_clips, MAX_ID_BYTES, end)
            except SidecarDamage as damage:
                _warn(f"the search ids {folder.path / name} are damaged: {damage}; writing them again")
                _files.remove(folder, name)
            except OSError:
                continue
        return _save_ids(folder, store, feature_set, key)


def _save_ids(folder: SidecarDir, store: Any, feature_set: str, key: str) -> np.ndarray | None:
    """Write the ``.ids`` sidecar from the store's id column (in ``ID_BLOCK_ROWS`` blocks); the ids, or
    None when they do not fit or the file cannot be written (answers then decode id blocks)."""
    parts, step = [], max(ID_BLOCK_ROWS, store.arrays.chunk_rows("index/clip_id"))  # each chunk read once
    for start in range(0, store.n_clips, step):
        ids = store.index.ids_at(np.arange(start, min(store.n_clips, start + step)))
        parts.append([c.encode("utf-8") for c in ids])
    widest = max((len(b) for part in parts for b in part), default=1)
    if widest > MAX_ID_BYTES or any(b.endswith(b"\0") for part in parts for b in part):
        return None  # numpy's fixed-width bytes drop trailing NULs: such an id would come back cut
    ids = np.array([b for part in parts for b in part], dtype=f"S{max(1, widest)}")
    try:
        name = _files.save(folder, key, ".ids", lambda f: np.lib.format.write_array(f, ids, allow_pickle=False),
                           set_state(store, feature_set).origin)
    except OSError as err:
        _warn(f"could not keep the search ids in {folder.path}: {describe_os_error(err)}; decoding them per query")
        return None
    _files.remove_others(folder, ".ids", name)
    return ids


def set_key(store: Any, feature_set: str, method: str) -> str:
    """What a built matrix/index of ``method`` depends on (see `SetState.key`)."""
    return set_state(store, feature_set).key(method)


def sidecar_dir(store: Any, feature_set: str) -> Path | None:
    """``<store path>.search/<feature set>/``, or None for stores at URLs (kept in memory only)."""
    where = _sidecar_parts(store, feature_set)
    return None if where is None else where[0].joinpath(*where[1])


def _sidecar_parts(store: Any, feature_set: str) -> tuple[Path, list[str]] | None:
    """(the store's parent directory, the names below it) of the sidecar directory; None at URLs."""
    location = str(store.location)
    if "://" in location and not location.startswith("file://"):
        return None
    store_path = Path(location.removeprefix("file://").rstrip("/"))
    return store_path.parent, [store_path.name + SIDECAR_SUFFIX, *feature_set.split("/")]


def _cached(store: Any, feature_set: str, method: str, key: str, build: Any, reuse: bool,
            notes: list[str] | None) -> Any:
    """The faiss index of ``key``: from the memo, else a checked sidecar file, else built now and
    saved; ``reuse=False`` skips memo and file (they gave a damaged answer)."""
    memo = _MEMO.setdefault(store, {})
    held = memo.get((method, feature_set))
    if reuse and held is not None and held.key == key:
        return held
    with _sidecar_folder(store, feature_set) as folder:
        built = _load_faiss(folder, store, feature_set, key) if reuse else None
    if built is None:
        t0 = time.perf_counter()
        built = build()  # outside the folder: it may open it itself for the clip matrix
        with _sidecar_folder(store, feature_set) as folder:
            saved = _save_faiss(folder, key, built, set_state(store, feature_set).origin)
        _note(notes, f"built the faiss index of {feature_set!r} ({built.index.ntotal} clips, nlist {built.nlist}, "
                     f"nprobe {built.default_nprobe}) in {time.perf_counter() - t0:.2f} s"
                     + (f"; saved to {folder.path / saved}" if saved else ""))
    memo[(method, feature_set)] = built
    return built


@contextlib.contextmanager
def _sidecar_folder(store: Any, feature_set: str) -> Iterator[SidecarDir | None]:
    """The open sidecar directory, or None (a URL store; a link or an unwritable place: one warning)."""
    where = _sidecar_parts(store, feature_set)
    with contextlib.ExitStack() as stack:
        folder = None
        if where is not None:
            try:
                folder = stack.enter_context(_files.open_dir(*where))
            except OSError as err:
                _warn(f"not keeping the search index in {err.filename or sidecar_dir(store, feature_set)}: "
                      f"{describe_os_error(err)}; searching in memory")
        yield folder


def _load_faiss(folder: SidecarDir | None, store: Any, feature_set: str, key: str) -> FaissIndex | None:
    """The checked faiss sidecar of ``key``, decoded; None when there is none that is whole.

    A damaged file (bytes other than its name's sha256, too large for the store, bound to another
    store, feature set or data version, contents that are not the store's done rows as unit vectors,
    undecodable) is removed with one warning line.
    """
    if folder is None:
        return None
    done = store.done_mask(feature_set)
    state = set_state(store, feature_set)
    dim = state.info.feature_shape[0]
    for name in _files.names(folder, key, ".lists"):
        try:
            index, lists = _files.read_lists_manifest(folder, name, done, dim, state.origin)
            return FaissIndex(key, index, int(index.nlist), lists)
        except SidecarDamage as damage:
            _warn(f"the search index {folder.path / name} is damaged: {damage}; rebuilding it")
            for other in [name, *_files.names(folder, key, ".faiss")]:
                _files.remove(folder, other)
        except OSError:
            continue  # removed meanwhile by another search, or unreadable: build
    max_bytes = 2 * int(done.sum()) * (4 * dim + 8) + 16 * 2**20  # twice what the done clips need
    for name in _files.names(folder, key, ".faiss"):
        try:
            with _files.open_checked(folder, name, max_bytes) as f:
                _files.check_binding(f, name, state.origin)
                index = _files.read_faiss(f, done, dim)
            with contextlib.suppress(OSError):  # an IVF file saved before .lists manifests: give it one
                _files.remove_others(folder, ".lists", _files.write_lists_manifest(folder, key, index, name))
            return FaissIndex(key, index, faiss_nlist(index))
        except SidecarDamage as damage:
            _warn(f"the search index {folder.path / name} is damaged: {damage}; rebuilding it")
            _files.remove(folder, name)
        except OSError:
            continue  # removed meanwhile by another search, or unreadable: build
    return None


def _save_faiss(folder: SidecarDir | None, key: str, built: FaissIndex, origin: dict[str, str | None]) -> str | None:
    """Keep ``built`` in the sidecar directory, bound to ``origin``, and drop the other faiss files;
    the file's name, or None when it was not written (a URL store, or a failure: one warning line)."""
    if folder is None:
        return None
    try:
        name = _files.save(folder, key, ".faiss", lambda f: _files.write_faiss(f, built.index), origin)
        lists = _files.write_lists_manifest(folder, key, built.index, name)
    except OSError as err:
        _warn(f"could not keep the search index in {folder.path}: {describe_os_error(err)}; searching in memory")
        for other in _files.names(folder, key, ".faiss"):
            _files.remove(folder, other)
        return None
    _files.remove_others(folder, ".lists", lists)
    _files.remove_others(folder, ".faiss", name)
    return name


def _warn(text: str) -> None:
    """One warning line on stderr; within one search call, the same line is said once (the matrix and
    the faiss index of one set share a directory, so an unwritable one would be reported twice)."""
    said = _WARNED.get()
    if said is not None:
        if text in said:
            return
        said.add(text)
    print(f"featurestore search: warning: {text}", file=sys.stderr)


def _choose_method(info: Any, method: str, notes: list[str]) -> str:
    if method == "exact":
        return method
    if method == "faiss":
        if not faiss_available():
            raise ValueError("search method 'faiss' needs faiss-cpu, which is not installed: "
                             "pip install 'avscene[faiss]'; "
                             "method 'exact' searches with numpy")
        return method
    values = info.n_done * info.feature_shape[0]
    if values <= APPROX_ABOVE:
        return "exact"
    if faiss_available():
        return "faiss"
    notes.append(f"faiss-cpu is not installed (pip install 'avscene[faiss]'): searching {info.n_done} clips exactly "
                 f"with numpy ({values / 1e6:.0f}M values a query; an approximate index answers sets above "
                 f"{APPROX_ABOVE / 1e6:.0f}M far faster)")
    return "exact"


def _note(notes: list[str] | None, text: str) -> None:
    if notes is not None:
        notes.append(text)
