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

Text queries (``text="a quiet park at night"``) go through the text tower of the same CLIP model:
``cliptext/<model>`` with the weights recorded in the store's class-feature provenance of that model
or, failing that, in the feature set's provenance (a tag, a checkpoint identified by its SHA-256, or
the random seed: ``@none`` builds the whole CLIP model under the seed, so both towers match). Random
weights are announced by the encoder and flagged in the result.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from featurestore.provenance import is_random_weights

EXACT_MAX_BYTES = 4 * 2**30  # clip matrices up to this size are searched exactly in memory by default
BLOCK_BYTES = 64 * 2**20  # rows read per block while building the clip matrix (about this many bytes)
FLAT_BELOW = 4096  # fewer clips than this: a faiss index is a plain flat (exact) index
CALIBRATION_RECALL = 0.97  # the IVF index visits enough lists to reach this recall@10 on sample queries
CALIBRATION_QUERIES = 200
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
    if method == "exact":
        rows, scores = clip_matrix(store, feature_set, notes).top_k(vector, int(k), exclude)
    else:
        rows, scores = faiss_index(store, feature_set, notes).top_k(vector, int(k), exclude, nprobe)
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


# ------------------------------------------------------------------------------- the clip matrix
@dataclass
class ClipMatrix:
    """Unit clip vectors of the done clips: ``matrix[i]`` belongs to store row ``rows[i]``."""

    key: str
    rows: np.ndarray
    matrix: np.ndarray

    def top_k(self, vector: np.ndarray, k: int, exclude: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        scores = self.matrix @ vector
        if exclude is not None:
            scores[self.rows == exclude] = -np.inf
        k = min(k, len(scores) - (exclude is not None and bool((self.rows == exclude).any())))
        if k <= 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.argsort(-scores[top], kind="stable")]
        return self.rows[top], scores[top]


def clip_matrix(store: Any, feature_set: str, notes: list[str] | None = None) -> ClipMatrix:
    """The clip matrix of a feature set: from this process's memo, the sidecar file, or built now."""
    key = set_key(store, feature_set, "exact")
    memo = _MEMO.setdefault(store, {})
    held = memo.get(("exact", feature_set))
    if held is not None and held.key == key:
        return held
    path = _sidecar(store, feature_set, key, ".npz")
    built = _load_matrix(path, key)
    if built is None:
        t0 = time.perf_counter()
        rows, matrix = _build_matrix(store, feature_set)
        built = ClipMatrix(key, rows, matrix)
        _save(path, lambda tmp: np.savez(tmp, rows=rows, matrix=matrix))
        _note(notes, f"built the clip matrix of {feature_set!r} ({len(rows)} clips) in "
                     f"{time.perf_counter() - t0:.2f} s" + (f"; saved to {path}" if path else ""))
    memo[("exact", feature_set)] = built
    return built


def _build_matrix(store: Any, feature_set: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows and unit clip vectors of every done clip, ``[n_done, dim]`` float32."""
    info = store.feature_info(feature_set)
    rows = np.flatnonzero(store.done_mask(feature_set))
    matrix = np.empty((len(rows), info.feature_shape[0]), dtype=np.float32)
    filled = 0
    for _, vectors in clip_blocks(store, feature_set):
        matrix[filled:filled + len(vectors)] = vectors
        filled += len(vectors)
    return rows, matrix


def clip_blocks(store: Any, feature_set: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(rows, unit clip vectors)`` of the done clips, reading whole chunks of about ``BLOCK_BYTES``."""
    info = store.feature_info(feature_set)
    done = store.done_mask(feature_set)
    row_bytes = max(1, int(np.prod(info.shape[1:])) * np.dtype(info.dtype).itemsize)
    block = max(1, BLOCK_BYTES // row_bytes // info.chunk_clips) * info.chunk_clips
    for start in range(0, store.n_clips, block):
        stop = min(store.n_clips, start + block)
        keep = done[start:stop]
        if keep.any():
            data = store.read_rows(feature_set, start, stop, check_done=False)[keep]
            yield start + np.flatnonzero(keep), clip_vectors(data)


def _load_matrix(path: Path | None, key: str) -> ClipMatrix | None:
    if path is None or not path.exists():
        return None
    try:
        with np.load(path) as f:
            return ClipMatrix(key, f["rows"], f["matrix"])
    except (OSError, ValueError, KeyError):
        return None  # a damaged sidecar is rebuilt


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
        return ids[keep][:k].astype(np.int64), scores[keep][:k]


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def faiss_index(store: Any, feature_set: str, notes: list[str] | None = None) -> FaissIndex:
    """The faiss index of a feature set: from this process's memo, the sidecar file, or built now."""
    import faiss

    key = set_key(store, feature_set, "faiss")
    memo = _MEMO.setdefault(store, {})
    held = memo.get(("faiss", feature_set))
    if held is not None and held.key == key:
        return held
    path = _sidecar(store, feature_set, key, ".faiss")
    built = None
    if path is not None and path.exists():
        try:
            index = faiss.read_index(str(path))
            built = FaissIndex(key, index, _nlist(index))
        except RuntimeError:
            built = None
    if built is None:
        t0 = time.perf_counter()
        built = build_faiss_index(store, feature_set, key)
        _save(path, lambda tmp: faiss.write_index(built.index, str(tmp)))
        _note(notes, f"built the faiss index of {feature_set!r} ({built.index.ntotal} clips, nlist {built.nlist}, "
                     f"nprobe {built.default_nprobe}) "
                     f"in {time.perf_counter() - t0:.2f} s" + (f"; saved to {path}" if path else ""))
    memo[("faiss", feature_set)] = built
    return built


def build_faiss_index(store: Any, feature_set: str, key: str = "") -> FaissIndex:
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
        index.train(sample)
    for rows, vectors in clip_blocks(store, feature_set):
        index.add_with_ids(vectors, rows.astype(np.int64))
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
        return vector, {"like": query}, row, False
    x = np.asarray(query, dtype=np.float32)
    if x.ndim == 2:
        x = x.mean(axis=0)
    return _unit(x, dim, "the query embedding"), {"vector": dim}, None, False


def _unit(x: np.ndarray, dim: int, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    if x.shape != (dim,):
        raise ValueError(f"{what} has {x.shape[0]} values but the feature set's embeddings have {dim}")
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
    location = str(store.location)
    if "://" in location and not location.startswith("file://"):
        return None
    base = Path(location.removeprefix("file://").rstrip("/") + SIDECAR_SUFFIX)
    return base.joinpath(*feature_set.split("/"))


def _sidecar(store: Any, feature_set: str, key: str, suffix: str) -> Path | None:
    folder = sidecar_dir(store, feature_set)
    return None if folder is None else folder / f"{key}{suffix}"


def _save(path: Path | None, write: Any) -> None:
    """Write atomically (temp + rename) and drop older files of the same kind; failures only warn."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
        write(tmp)
        os.replace(tmp, path)
        for old in path.parent.glob(f"*{path.suffix}"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError as err:
        print(f"featurestore search: warning: could not keep the search index in {path.parent}: {err}",
              file=sys.stderr)


def _choose_method(info: Any, method: str, notes: list[str]) -> str:
    if method == "exact":
        return method
    if method == "faiss":
        if not faiss_available():
            raise ValueError("search method 'faiss' needs faiss-cpu (pip install faiss-cpu); "
                             "method 'exact' searches with numpy")
        return method
    big = info.n_done * info.feature_shape[0] * 4 > EXACT_MAX_BYTES
    if not big:
        return "exact"
    if faiss_available():
        return "faiss"
    notes.append(f"faiss-cpu is not installed: searching {info.n_done} clips exactly with numpy "
                 f"(the clip matrix needs {info.n_done * info.feature_shape[0] * 4 / 2**30:.1f} GiB)")
    return "exact"


def _note(notes: list[str] | None, text: str) -> None:
    if notes is not None:
        notes.append(text)
