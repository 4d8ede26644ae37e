"""Search stored embeddings: the clips nearest to a clip, a vector or a sentence, by cosine similarity.

A clip's search vector is the mean of its stored segment/frame embeddings, L2-normalised, so the
score is the cosine similarity of clip-level means. Only clips whose ``done`` flag is set take part.

Two methods answer the same question:

* ``exact`` (numpy): the clip-level matrix ``[n_done, dim]`` float32 is built once (block by block,
  never the whole feature set in memory) and a query is one matrix-vector product plus a partial
  sort. This is the default while the matrix fits in ``EXACT_MAX_BYTES``.
* ``faiss``: an inverted-file index (``IVF<nlist>,Flat``, inner product; ``Flat`` for small sets)
  built from the same clip vectors, for sets whose clip matrix would not fit in memory or when asked.
  The number of lists a query visits is calibrated at build time: the fewest that reach recall@10
  >= ``CALIBRATION_RECALL`` against exact answers for sample queries.
  faiss-cpu is optional: without it ``auto`` falls back to exact search and says so.

Both the matrix and the index are built once and kept beside the store, in the sidecar directory
``<store path>.search/<feature set>/`` (the store itself is never written, so a read-only store can
be searched), under a key made of the feature set's fingerprint, its done mask and the method's
parameters: a set that changes (new clips done, another encoder) gets a new key and is rebuilt; older
files of that set are removed. Stores at URLs (``memory://``, ``s3://``) keep them in memory only.
Within one process, a store object keeps what it built (weakly), so a warm query is a matmul.

The sidecar files are caches, never trusted (`featurestore.store._search_files`): each file's name
carries the sha256 of its bytes, checked before anything is decoded, once per file per process
(the check is remembered by the file's inode, size, mtime and ctime, so warm queries and stores
reopened in the same process do not hash again); what is read is bounded by the file's size and the
store's done rows before anything is allocated; the decoded rows must be done store rows and the
vectors unit vectors; and a query that yields a "cosine" outside [-1, 1] drops what it used. Any
of these is damage: one warning line, the file is removed and the index rebuilt from the store.
Directories are opened without following links: a symbolic link where a sidecar directory belongs
is never used (search answers from memory), and cleaning never deletes through a link. When the
sidecar cannot be written (a read-only directory), search warns once and answers from memory.

Text queries (``text="a quiet park at night"``) go through the text tower of the same CLIP model:
``cliptext/<model>`` with the weights recorded in the store's class-feature provenance of that model
or, failing that, in the feature set's provenance (a tag, a checkpoint identified by its SHA-256, or
the random seed: ``@none`` builds the whole CLIP model under the seed, so both towers match). Random
weights are announced by the encoder and flagged in the result.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np

from featurestore.atomic_files import describe_os_error
from featurestore.provenance import is_random_weights
from featurestore.store import _search_files as _files
from featurestore.store._search_files import SidecarDamage, SidecarDir

EXACT_MAX_BYTES = 4 * 2**30  # clip matrices up to this size are searched exactly in memory by default
BLOCK_BYTES = 64 * 2**20  # rows read per block while building the clip matrix (about this many bytes)
FLAT_BELOW = 4096  # fewer clips than this: a faiss index is a plain flat (exact) index
CALIBRATION_RECALL = 0.97  # the IVF index visits enough lists to reach this recall@10 on sample queries
CALIBRATION_QUERIES = 200
COSINE_TOLERANCE = 1e-3  # float32 rounding of unit vectors stays far below this; beyond it, a score is no cosine
METHODS = ("auto", "exact", "faiss")
SIDECAR_SUFFIX = ".search"

_MEMO: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


@dataclass
class SearchResult:
    """The ``k`` nearest clips, best first.

    Attributes:
        clip_ids: clip ids, best first.
        scores: cosine similarities, ``[k]`` float32.
        labels: class names (None where the label is unknown).
        feature_set: the searched feature set.
        method: ``exact`` or ``faiss``.
        query: what was asked (``{"like": id}``, ``{"text": ..., "encoder": spec}`` or ``{"vector": dim}``).
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
def search(store: Any, feature_set: str, query: str | np.ndarray | None = None, k: int = 10, *,
           text: str | None = None, method: str = "auto", include_self: bool = False,
           nprobe: int | None = None, device: str = "cpu") -> SearchResult:
    """The ``k`` clips whose clip-level embeddings are nearest (cosine) to the query.

    Args:
        store: an open `FeatureStore`.
        feature_set: the embedding set to search (``[n_clips, n_segments, dim]``).
        query: a clip id in the store (search "more like this clip"), or an embedding ``[dim]`` or
            ``[n_segments, dim]`` (averaged). Leave None and give ``text`` for a text query.
        k: how many clips to return (fewer when fewer clips are done).
        text: a sentence, embedded by the matching ``cliptext`` tower (CLIP feature sets only).
        method: ``auto`` (exact while the clip matrix fits in ``EXACT_MAX_BYTES``, else faiss),
            ``exact`` or ``faiss``.
        include_self: keep the query clip in the results of a clip-id query (default: left out).
        nprobe: faiss IVF lists visited per query (default: the number calibrated when the index was
            built to reach ``CALIBRATION_RECALL`` recall@10 on sample queries).
        device: where the text tower runs.

    Raises:
        UnknownFeatureError, UnknownClipError, MissingFeatureError (the query clip is not done),
        ValueError: bad ``k``/method/query shape, a feature set that is not one vector per segment,
        or a text query on a set without a CLIP text tower.
    """
    if method not in METHODS:
        raise ValueError(f"search method must be one of {', '.join(METHODS)}, got {method!r}")
    if int(k) < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    state = set_state(store, feature_set)  # raises UnknownFeatureError naming the stored sets
    info = state.info
    if len(info.feature_shape) != 1:
        raise ValueError(f"feature set {feature_set!r} holds {list(info.feature_shape)} arrays per segment; "
                         f"search needs one embedding vector per segment")
    notes: list[str] = []
    vector, described, self_row, random = _query_vector(store, info, query, text, device)
    method = _choose_method(info, method, notes)
    exclude = None if include_self or self_row is None else self_row
    try:
        rows, scores = _top_k(store, feature_set, method, vector, int(k), exclude, nprobe, notes, reuse=True)
    except SidecarDamage as damage:  # a loaded index gave a "cosine" outside [-1, 1]: never served
        _warn(f"the {method} search index of {feature_set!r} {damage}; rebuilding it from the store")
        rows, scores = _top_k(store, feature_set, method, vector, int(k), exclude, nprobe, notes, reuse=False)
    ids, labels, classes = state.clip_ids, state.labels, state.classes
    return SearchResult([ids[r] for r in rows], scores.astype(np.float32),
                        [classes[labels[r]] if labels[r] >= 0 else None for r in rows],
                        feature_set, method, described, random or info.random_weights, notes)


def clip_vectors(segments: np.ndarray) -> np.ndarray:
    """Clip-level search vectors: the mean over segments, L2-normalised (float32).

    Args:
        segments: ``[n, n_segments, dim]`` (or ``[n_segments, dim]`` for one clip).
    """
    x = np.asarray(segments, dtype=np.float32)
    mean = x.mean(axis=-2)
    norm = np.linalg.norm(mean, axis=-1, keepdims=True)
    return mean / np.maximum(norm, 1e-12)


def _top_k(store: Any, feature_set: str, method: str, vector: np.ndarray, k: int, exclude: int | None,
           nprobe: int | None, notes: list[str], reuse: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rows and scores of the ``k`` best; ``reuse=False`` builds the index anew from the store."""
    if method == "exact":
        return clip_matrix(store, feature_set, notes, reuse=reuse).top_k(vector, k, exclude)
    return faiss_index(store, feature_set, notes, reuse=reuse).top_k(vector, k, exclude, nprobe)


def check_cosines(scores: np.ndarray) -> None:
    """Raise `SidecarDamage` when a score cannot be a cosine of unit vectors (outside [-1, 1], NaN).

    Unit query and clip vectors give cosines within float32 rounding of [-1, 1]; anything else
    means the index that produced them holds other numbers than the ones built (a flipped bit).
    """
    if scores.size:
        worst = max(float(scores.max()), -float(scores.min()))  # NaN stays NaN; no temporary array
        if not worst <= 1 + COSINE_TOLERANCE:
            raise SidecarDamage(f"gave a cosine of {worst:.3g}, outside [-1, 1]")


# ------------------------------------------------------------------------------- the clip matrix
@dataclass
class ClipMatrix:
    """Unit clip vectors of the done clips: ``matrix[i]`` belongs to store row ``rows[i]``."""

    key: str
    rows: np.ndarray
    matrix: np.ndarray

    def top_k(self, vector: np.ndarray, k: int, exclude: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Rows and cosines of the ``k`` best; `SidecarDamage` when a score is no cosine (checked on
        all scores: one pass over ``n`` floats, next to the ``n x dim`` product)."""
        scores = self.matrix @ vector
        check_cosines(scores)
        if exclude is not None:
            scores[self.rows == exclude] = -np.inf
        k = min(k, len(scores) - (exclude is not None and bool((self.rows == exclude).any())))
        if k <= 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.argsort(-scores[top], kind="stable")]
        return self.rows[top], scores[top]


def clip_matrix(store: Any, feature_set: str, notes: list[str] | None = None, *, reuse: bool = True) -> ClipMatrix:
    """The clip matrix of a feature set: from this process's memo, the sidecar file, or built now
    (always built when ``reuse`` is False)."""
    def build() -> ClipMatrix:
        rows, matrix = _build_matrix(store, feature_set, notes)
        return ClipMatrix(key, rows, matrix)

    key = set_key(store, feature_set, "exact")
    return _cached(store, feature_set, "exact", key, build, reuse, notes)


def _build_matrix(store: Any, feature_set: str, notes: list[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """Rows and unit clip vectors of every done clip with finite values, ``[n, dim]`` float32."""
    info = store.feature_info(feature_set)
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
    info = store.feature_info(feature_set)
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
    left = np.setdiff1d(np.flatnonzero(done), rows)
    if len(left):
        ids = [store.clip_ids[r] for r in left[:5]]
        _note(notes, f"{len(left)} done clips hold non-finite values and are left out of the search: "
                     f"{', '.join(ids)}{', ...' if len(left) > 5 else ''}")


# -------------------------------------------------------------------------------- the faiss index
@dataclass
class FaissIndex:
    """A faiss inner-product index over unit clip vectors; its ids are store rows."""

    key: str
    index: Any
    nlist: int

    @property
    def default_nprobe(self) -> int:
        """IVF lists visited per query: the value calibrated at build time (see `calibrate_nprobe`)."""
        return int(getattr(self.index, "nprobe", 1)) if self.nlist > 1 else 1

    def top_k(self, vector: np.ndarray, k: int, exclude: int | None = None,
              nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        want = min(k + (exclude is not None), self.index.ntotal)
        params = None
        if self.nlist > 1 and nprobe:
            import faiss

            params = faiss.SearchParametersIVF(nprobe=int(nprobe))
        scores, ids = self.index.search(vector[None].astype(np.float32), want, params=params)
        scores, ids = scores[0], ids[0]
        keep = (ids >= 0) & (ids != (-2 if exclude is None else exclude))
        check_cosines(scores[ids >= 0])
        return ids[keep][:k].astype(np.int64), scores[keep][:k]


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def faiss_index(store: Any, feature_set: str, notes: list[str] | None = None, *, reuse: bool = True) -> FaissIndex:
    """The faiss index of a feature set: from this process's memo, the sidecar file, or built now
    (always built when ``reuse`` is False)."""
    key = set_key(store, feature_set, "faiss")
    return _cached(store, feature_set, "faiss", key, lambda: build_faiss_index(store, feature_set, key, notes),
                   reuse, notes)


def build_faiss_index(store: Any, feature_set: str, key: str = "", notes: list[str] | None = None) -> FaissIndex:
    """Train and fill an ``IVF<nlist>,Flat`` inner-product index (``Flat`` below ``FLAT_BELOW`` clips).

    nlist is about ``4 * sqrt(n)``, at most ``n / 39`` (faiss wants 39 training points per list);
    training uses at most 64 random clip vectors per list. The vectors are then added block by block,
    so no clip matrix is held: the index is what stays in memory.
    """
    import faiss

    info = store.feature_info(feature_set)
    dim, n = info.feature_shape[0], int(store.done_mask(feature_set).sum())
    nlist = 1 if n < FLAT_BELOW else max(1, min(int(4 * np.sqrt(n)), n // 39))  # faiss wants 39 points per list
    if nlist == 1:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    else:
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = None
    if nlist > 1:
        done_ids = [store.clip_ids[r] for r in np.flatnonzero(store.done_mask(feature_set))]
        pick = np.sort(np.random.default_rng(0).choice(len(done_ids), size=min(len(done_ids), 64 * nlist),
                                                       replace=False))
        sample = clip_vectors(store.get_many(feature_set, [done_ids[i] for i in pick]))
        sample_rows = np.flatnonzero(store.done_mask(feature_set))[pick]
        finite = np.isfinite(sample).all(axis=1)
        sample, sample_rows = sample[finite], sample_rows[finite]
        index.train(sample)
    added = []
    for rows, vectors in clip_blocks(store, feature_set):
        index.add_with_ids(vectors, rows.astype(np.int64))
        added.append(rows)
    _note_not_finite(store, store.done_mask(feature_set), np.concatenate(added) if added else np.empty(0), notes)
    if nlist > 1:
        spread = np.linspace(0, len(sample) - 1, min(len(sample), CALIBRATION_QUERIES)).astype(int)
        index.nprobe = calibrate_nprobe(index, store, feature_set, sample[spread], sample_rows[spread])
    return FaissIndex(key, index, nlist)


def calibrate_nprobe(index: Any, store: Any, feature_set: str, queries: np.ndarray, query_rows: np.ndarray,
                     k: int = 10) -> int:
    """The fewest IVF lists (8, 16, 32, ... nlist) whose recall@k reaches ``CALIBRATION_RECALL``.

    ``queries`` are stored clips (rows ``query_rows``), searched the way ``--like`` does: the clip
    itself left out of both answers.

    The exact answers come from one more pass over the feature set (block by block). How many lists
    are needed depends on the data: clustered embeddings (real ones) need few, embeddings spread
    evenly over the sphere need nearly all of them (the benchmark shows both); calibrating keeps the
    recall promise either way and records the speed it costs in the index (faiss saves ``nprobe``).
    """
    k1 = k + 1
    exact_scores = np.full((len(queries), k1), -np.inf, dtype=np.float32)
    exact_rows = np.full((len(queries), k1), -1, dtype=np.int64)
    for rows, vectors in clip_blocks(store, feature_set):
        scores = np.concatenate([exact_scores, queries @ vectors.T], axis=1)
        ids = np.concatenate([exact_rows, np.broadcast_to(rows, (len(queries), len(rows)))], axis=1)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k1]
        exact_scores, exact_rows = np.take_along_axis(scores, top, 1), np.take_along_axis(ids, top, 1)
    nlist = index.nlist
    nprobe = min(8, nlist)
    while True:
        index.nprobe = nprobe
        _, found = index.search(queries, k1)
        recall = np.mean([len(_others(a, q, k) & _others(b, q, k)) / k
                          for a, b, q in zip(found, exact_rows, query_rows)])
        if recall >= CALIBRATION_RECALL or nprobe >= nlist:
            return nprobe
        nprobe = min(nlist, nprobe * 2)


def _others(rows: np.ndarray, own: int, k: int) -> set[int]:
    return set([int(r) for r in rows if r != own][:k])


def _nlist(index: Any) -> int:
    import faiss

    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:
        return 1


# ------------------------------------------------------------------------------------- queries
def _query_vector(store: Any, info: Any, query: Any, text: str | None,
                  device: str) -> tuple[np.ndarray, dict, int | None, bool]:
    """(unit query vector, what was asked, the query clip's row or None, random text tower)."""
    dim = info.feature_shape[0]
    if (query is None) == (text is None):
        raise ValueError("give exactly one query: a clip id, an embedding, or text=")
    if text is not None:
        vector, spec, random = text_vector(store, info, text, device)
        return _unit(vector, dim, "the text embedding"), {"text": text, "encoder": spec}, None, random
    if isinstance(query, str):
        row = store.row(query)  # raises UnknownClipError with the nearest ids
        vector = clip_vectors(store.get(info.name, query))  # MissingFeatureError when not done
        if not np.isfinite(vector).all():
            raise ValueError(f"clip {query!r} holds non-finite values in feature set {info.name!r}: it has "
                             f"no cosine to search by")
        return vector, {"like": query}, row, False
    x = np.asarray(query, dtype=np.float32)
    if x.ndim == 2:
        x = x.mean(axis=0)
    return _unit(x, dim, "the query embedding"), {"vector": dim}, None, False


def _unit(x: np.ndarray, dim: int, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    if x.shape != (dim,):
        raise ValueError(f"{what} has {x.shape[0]} values but the feature set's embeddings have {dim}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} holds non-finite values (NaN or inf)")
    return x / max(float(np.linalg.norm(x)), 1e-12)


def text_encoder_spec(store: Any, info: Any) -> str:
    """The ``cliptext/<model>@<weights>`` spec matching a ``clip/<model>`` feature set.

    The store's class features say which text tower went with the image tower: first a set made by
    ``cliptext/<model>`` with the same weights (whatever its name: a store may hold two weight
    choices of one model, ``vit_random=clip/ViT-B-32@none``), then, for the default-named
    ``clip/<model>`` set, the ``cliptext/<model>`` class features; otherwise the weights come from
    the feature set's own provenance.
    """
    from featurestore._spec import parse_spec
    from featurestore.provenance import weights_identity

    prov = info.provenance or {}
    spec = parse_spec(str(prov.get("encoder") or info.name))
    if spec.family != "clip" or not spec.model:
        raise ValueError(f"feature set {info.name!r} was made by {prov.get('encoder') or info.name!r}, which has "
                         f"no CLIP text tower; text queries need a clip/<model> feature set")
    text_name = f"cliptext/{spec.model}"
    towers = {name: store.get_class_features(name)[1].get("provenance") or {} for name in store.class_feature_sets()}
    towers = {name: p for name, p in towers.items() if _spec_name(p.get("encoder")) == text_name}
    same = [p for p in towers.values() if prov.get("weights") and weights_identity(p) == weights_identity(prov)]
    if same:
        return str(same[0]["encoder"])
    if info.name == spec.name and towers.get(text_name, {}).get("encoder"):
        return str(towers[text_name]["encoder"])
    return f"{text_name}@{_weights_text(prov.get('weights') or {}, spec.weights, info.name)}"


def _spec_name(encoder: Any) -> str | None:
    """``cliptext/ViT-B-32`` of ``cliptext/ViT-B-32@openai``; None for anything that is not a spec."""
    from featurestore._spec import SpecError, parse_spec

    try:
        return parse_spec(str(encoder)).name if encoder else None
    except SpecError:
        return None


def _weights_text(weights: dict, fallback: str | None, name: str) -> str:
    kind = weights.get("kind")
    if kind == "random":
        seed = int(weights.get("seed", 0))
        return "none" if seed == 0 else f"none:{seed}"
    if kind == "pretrained" and weights.get("tag"):
        return str(weights["tag"])
    if kind == "file" and weights.get("path"):
        return str(weights["path"])
    if fallback:
        return fallback
    raise ValueError(f"feature set {name!r}: its provenance does not say which weights made it "
                     f"({weights or 'nothing recorded'}), so no matching text tower can be built")


def text_vector(store: Any, info: Any, text: str, device: str = "cpu") -> tuple[np.ndarray, str, bool]:
    """Embed ``text`` with the matching text tower: (vector, the encoder spec, random weights)."""
    from featurestore.encoders import create_encoder

    spec = text_encoder_spec(store, info)
    recorded = (info.provenance or {}).get("weights") or {}
    memo = _MEMO.setdefault(store, {})
    encoder = memo.get(("text", spec))
    if encoder is None:
        encoder = create_encoder(spec, device=device)  # announces random weights itself
        memo[("text", spec)] = encoder
    built = encoder.weights_provenance()
    if recorded.get("kind") == "file" and built.get("sha256") != recorded.get("sha256"):
        raise ValueError(f"text tower {spec}: checkpoint sha256 {built.get('sha256')} differs from the "
                         f"{recorded.get('sha256')} recorded with feature set {info.name!r}")
    vector = encoder.encode_text([text])[0].cpu().numpy()
    return vector, encoder.spec, is_random_weights({"weights": built})


# ------------------------------------------------------------------------- keys and the sidecar
@dataclass
class SetState:
    """What a search needs to know about a feature set, kept while its done mask stays the same.

    Reading ``feature_info`` and the label column costs milliseconds (they are read from the store
    every time); the done mask is cached by the store until ``store.refresh()``, so hashing it is
    the cheap test of "has this set changed" that keeps a warm query a matrix product.
    """

    done_key: str
    info: Any
    clip_ids: list[str]
    labels: np.ndarray
    classes: list[str]

    def key(self, method: str) -> str:
        """What a built matrix/index depends on: fingerprint, shape, done mask + data version, method."""
        text = json.dumps([self.info.fingerprint, list(self.info.shape), method, FLAT_BELOW, self.done_key])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def set_state(store: Any, feature_set: str) -> SetState:
    """The feature set's `SetState`, rebuilt when its done mask or data version differs from the one
    it was made with (both are cached by the store until ``store.refresh()``)."""
    done = store.done_mask(feature_set)  # UnknownFeatureError for a bad name; cached by the store
    version = str(store.data_version(feature_set))  # changes when done rows are written again
    done_key = hashlib.sha256(np.packbits(done).tobytes() + f"{len(done)}/{version}".encode()).hexdigest()[:16]
    memo = _MEMO.setdefault(store, {})
    state = memo.get(("state", feature_set))
    if state is None or state.done_key != done_key:
        state = SetState(done_key, store.feature_info(feature_set), store.clip_ids,
                         np.asarray(store.labels), store.classes)
        memo[("state", feature_set)] = state
    return state


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


_SUFFIX = {"exact": ".npz", "faiss": ".faiss"}


def _cached(store: Any, feature_set: str, method: str, key: str, build: Any, reuse: bool,
            notes: list[str] | None) -> Any:
    """What ``build()`` makes for ``key``: from the memo, else a checked sidecar file, else built
    now and saved; ``reuse=False`` skips memo and file (they gave a damaged answer)."""
    memo = _MEMO.setdefault(store, {})
    held = memo.get((method, feature_set))
    if reuse and held is not None and held.key == key:
        return held
    with _sidecar_folder(store, feature_set) as folder:
        built = _load(folder, store, feature_set, method, key) if reuse else None
        if built is None:
            t0 = time.perf_counter()
            built = build()
            saved = _save(folder, key, method, built)
            what = (f"the clip matrix of {feature_set!r} ({len(built.rows)} clips)" if method == "exact" else
                    f"the faiss index of {feature_set!r} ({built.index.ntotal} clips, nlist {built.nlist}, "
                    f"nprobe {built.default_nprobe})")
            _note(notes, f"built {what} in {time.perf_counter() - t0:.2f} s"
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


def _load(folder: SidecarDir | None, store: Any, feature_set: str, method: str, key: str) -> Any:
    """The checked sidecar file of ``key``, decoded; None when there is none that is whole.

    A damaged file (bytes other than its name's sha256, too large for the store, contents that are
    not the store's done rows as unit vectors, undecodable) is removed with one warning line.
    """
    if folder is None:
        return None
    done = store.done_mask(feature_set)
    dim = store.feature_info(feature_set).feature_shape[0]
    max_bytes = 2 * int(done.sum()) * (4 * dim + 8) + 16 * 2**20  # twice what the done clips need
    for name in _files.names(folder, key, _SUFFIX[method]):
        try:
            with _files.open_checked(folder, name, max_bytes) as f:
                if method == "exact":
                    return ClipMatrix(key, *_files.read_matrix(f, done, dim))
                index = _files.read_faiss(f, done, dim)
                return FaissIndex(key, index, _nlist(index))
        except SidecarDamage as damage:
            _warn(f"the search index {folder.path / name} is damaged: {damage}; rebuilding it")
            _files.remove(folder, name)
        except OSError:
            continue  # removed meanwhile by another search, or unreadable: build
    return None


def _save(folder: SidecarDir | None, key: str, method: str, built: Any) -> str | None:
    """Keep ``built`` in the sidecar directory and drop the other files of its kind; the file's name,
    or None when it was not written (a URL store, or a failure: one warning line)."""
    if folder is None:
        return None
    suffix = _SUFFIX[method]
    try:
        name = _files.save(folder, key, suffix, lambda f: _encode(method, built, f))
    except OSError as err:
        _warn(f"could not keep the search index in {folder.path}: {describe_os_error(err)}; searching in memory")
        return None
    _files.remove_others(folder, suffix, name)
    return name


def _encode(method: str, built: Any, f: BinaryIO) -> None:
    if method == "exact":
        _files.write_matrix(f, built.rows, built.matrix)
    else:
        _files.write_faiss(f, built.index)


def _warn(text: str) -> None:
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
    big = info.n_done * info.feature_shape[0] * 4 > EXACT_MAX_BYTES
    if not big:
        return "exact"
    if faiss_available():
        return "faiss"
    notes.append(f"faiss-cpu is not installed (pip install 'avscene[faiss]'): searching {info.n_done} clips exactly with numpy "
                 f"(the clip matrix needs {info.n_done * info.feature_shape[0] * 4 / 2**30:.1f} GiB)")
    return "exact"


def _note(notes: list[str] | None, text: str) -> None:
    if notes is not None:
        notes.append(text)
