"""What the viewer's pages show, as plain data: map points, one clip, a confusion matrix, a search.

Kept apart from the web app (`featurestore.viewer.app`) so tests and the benchmark call it directly.
Everything is read through the store object (its index and arrays); nothing here writes.
"""
from __future__ import annotations

import base64
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.errors import MissingFeatureError
from featurestore.viewer.images import frame_sets, logmel_sets
from featurestore.viewer.media import KINDS, MediaMissing, MediaRefused, media_path
from featurestore.viewer.outputs import Source
from featurestore.viewer.projection import Projection

NEIGHBOURS = 8
SEARCH_K = 20  # search results by default
MAX_K = 200  # search results at most: each is a list item and a ringed point
MAX_QUERY = 1000  # characters of a search query: a text tower reads 77 tokens; more is a mistake or an attack
CHUNKS_KEPT = 4  # decoded chunks of the media path columns a running app keeps (65,536 paths each)
PLAIN_COLOURS = ("label", "city", "split")
WIRE_CODES = {"uint16": "<u2", "uint32": "<u4"}  # the map's group codes on the wire (`group_dtype`)


@dataclass
class ViewState:
    """What the app holds while it runs: the open store, the map's sets and the outputs it can show."""

    store: Any
    projections: dict[str, Projection]
    sources: dict[str, Source]
    index: dict[str, np.ndarray] = field(default_factory=dict)  # label, city, split columns, read once
    covered: dict[str, np.ndarray] = field(default_factory=dict)  # source -> rows it answers for, read once
    attrs: dict[str, Any] = field(default_factory=dict)  # the store's root attributes
    frame_sets: list[str] = field(default_factory=list)
    logmel_sets: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    chunks: "OrderedDict[tuple[str, int], np.ndarray]" = field(default_factory=OrderedDict)  # path columns, LRU
    map_json: dict[str, bytes] = field(default_factory=dict)  # feature set -> its ids and positions, JSON
    coded: dict[str, tuple[list[str], np.ndarray]] = field(default_factory=dict)  # column -> (names, codes)
    store_inode: int | None = None  # the store's folder at start: a page tells a deleted or replaced store

    def __post_init__(self) -> None:
        """What every clip page needs and a running app never sees change: read once, not per page
        (each read is a metadata or chunk request, milliseconds each on a loaded machine)."""
        self.attrs = dict(self.store.attrs)
        self.frame_sets, self.logmel_sets = frame_sets(self.store), logmel_sets(self.store)
        self.splits = self.store.splits()
        self.store_inode = _inode(self.store.location)

    def value(self, column: str, row: int) -> str:
        """One row of a string column (media paths), through a few decoded chunks kept (LRU): the
        columns are not held whole (memory), and neighbours' pages often fall in a chunk read before."""
        per = self.store.arrays.chunk_rows(f"index/{column}")
        key = (column, row // per)
        if key not in self.chunks:
            start = key[1] * per
            self.chunks[key] = self.store.arrays.read(f"index/{column}", start, min(self.store.n_clips, start + per))
            while len(self.chunks) > CHUNKS_KEPT:
                self.chunks.popitem(last=False)
        self.chunks.move_to_end(key)
        return str(self.chunks[key][row % per])

    def covers(self, source: str) -> np.ndarray:
        """The store rows ``source`` answers for (bool per row), read once."""
        if source not in self.covered:
            covered = np.asarray(self.sources[source].covered(), dtype=bool)
            if covered.shape != (self.store.n_clips,):  # else numpy's broadcast error, naming nothing
                raise ValueError(f"output {source!r} says which clips it covers with shape {covered.shape}; "
                                 f"expected ({self.store.n_clips},), one flag per clip of the store")
            self.covered[source] = covered
        return self.covered[source]

    def scores(self, source: str, clip_ids: list[str]) -> np.ndarray:
        """The source's clip probabilities ``[n, n_classes]``, checked: a provider's wrong shape or a
        NaN row was argmax-ed into a class (NaN counts as the largest), drawn and counted in the
        confusion matrix as that class, silently. Now one line naming the output and a clip."""
        out = np.asarray(self.sources[source].score(clip_ids), dtype=np.float64)
        want = (len(clip_ids), len(self.store.classes))
        if out.shape != want:
            raise ValueError(f"output {source!r} gave scores of shape {out.shape} for {want[0]} clip(s) "
                             f"of {want[1]} classes")
        bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
        if len(bad):
            raise ValueError(f"output {source!r} gave non-finite scores for {len(bad)} clip(s), "
                             f"e.g. {clip_ids[int(bad[0])]!r}")
        return out

    def in_split(self, split: str) -> np.ndarray:
        """Membership of one split (bool per row), read once."""
        key = f"split/{split}"
        if key not in self.index:
            self.index[key] = self.store.column(key).astype(bool)
        return self.index[key]

    def labels(self) -> np.ndarray:
        """Class index of every row (-1: no label), read once."""
        if "label_index" not in self.index:
            self.index["label_index"] = np.asarray(self.store.labels, dtype=np.int64)
        return self.index["label_index"]

    def groups(self, name: str) -> tuple[list[str], np.ndarray]:
        """An index column for every row as (distinct names, int32 code per row), read once:
        ``label``, ``city``, ``split`` (first split the clip is in). Codes, not a Python string per
        row: at 100,000 clips an object column is ~6 MiB that the allocators keep after it is gone."""
        if name not in self.coded:
            self.coded[name] = _read_groups(self.store, name)
        return self.coded[name]


def _inode(location: Any) -> int | None:
    """The inode of a local store's path (None for URLs and paths that cannot be read)."""
    text = str(location)
    if "://" in text and not text.startswith("file://"):
        return None
    try:
        return Path(text.removeprefix("file://")).stat().st_ino
    except OSError:
        return None


def unclaimed(name: str, taken: Any) -> str:
    """``name`` for a built-in group (no label, no split, not predicted), or ``name`` numbered
    (``(no label 2)``) while the store already names something so: a class literally called
    "(no label)" shared the built-in group's legend entry and name, its clips indistinguishable
    from the unlabelled ones."""
    taken = set(taken)
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name[:-1]} {n})" if name.endswith(")") else f"{name} {n}"
    return candidate


def _read_groups(store: Any, name: str) -> tuple[list[str], np.ndarray]:
    if name == "label":
        labels = np.asarray(store.labels, dtype=np.int32)
        return ([*store.classes, unclaimed("(no label)", store.classes)],
                np.where(labels < 0, len(store.classes), labels).astype(np.int32))
    if name == "split":
        splits = store.splits()
        codes = np.full(store.n_clips, len(splits), dtype=np.int32)
        for i, split in reversed(list(enumerate(splits))):
            codes[store.column(f"split/{split}").astype(bool)] = i
        return [*splits, unclaimed("(none)", splits)], codes
    names, codes = np.unique(store.column(name), return_inverse=True)
    return [str(v) for v in names], codes.astype(np.int32)


class BadRequest(ValueError):
    """A request's parameter the viewer cannot answer (unknown colour, source, split; k or a query out
    of range): 400 with this one line. Kept apart from the store's own errors, which say the store is
    unreadable rather than the request wrong."""


def check_k(text: str | None) -> int:
    """``k`` from a query string: an integer in 1..`MAX_K` (default `SEARCH_K`), else BadRequest."""
    if text is None or text == "":
        return SEARCH_K
    value = int(text) if text.isascii() and text.isdigit() and len(text) <= 6 else None
    if value is None or not 1 <= value <= MAX_K:
        raise BadRequest(f"k must be a whole number from 1 to {MAX_K}, got {text[:20]!r}")
    return value


def check_split(state: "ViewState", split: str | None) -> str | None:
    """A split the store has (None or '' is every clip), else BadRequest naming the ones it has."""
    if split and split not in state.splits:
        raise BadRequest(f"no split {split[:80]!r} in the store; it has {', '.join(state.splits) or 'none'}")
    return split or None


# ------------------------------------------------------------------------------------- the map
def colour_options(state: ViewState) -> list[str]:
    """What the map can colour by: index columns, then each output's predicted class and right/wrong."""
    return [*PLAIN_COLOURS, *(f"{kind}:{name}" for name in state.sources for kind in ("predicted", "correct"))]


def map_points(state: ViewState, feature_set: str, colour: str = "label") -> dict[str, Any]:
    """Positions, clip ids and one group per point (one WebGL trace per group), decoded: what
    `map_points_json` sends, as Python values."""
    wire = json.loads(map_points_json(state, feature_set, colour))
    ids = wire["ids"].split("\n") if isinstance(wire["ids"], str) else wire["ids"]
    decoded = {name: np.frombuffer(base64.b64decode(wire[name]), dtype=dtype)
               for name, dtype in (("x", "<f4"), ("y", "<f4"), ("group", WIRE_CODES[wire["group_dtype"]]))}
    return {**wire, "ids": ids, **decoded}


def map_points_json(state: ViewState, feature_set: str, colour: str = "label") -> str:
    """The map's data as JSON text (`map_points_parts` joined: tests and the benchmark)."""
    return b"".join(map_points_parts(state, feature_set, colour)).decode("utf-8")


def map_points_parts(state: ViewState, feature_set: str, colour: str = "label", piece: int = 1 << 18) -> list[Any]:
    """The map's data as JSON in pieces of at most ``piece`` bytes, made to be small and quick to
    parse at 100,000 clips: positions and group codes as base64 little-endian arrays (float32;
    uint16, or uint32 past 65,536 groups, as ``group_dtype`` says), the ids as one string joined by newlines (a list if an id holds one). The ids and
    positions of a set are encoded once and kept as UTF-8 bytes; each colouring adds its groups only.
    Pieces (views of the kept bytes) are streamed, so a request copies none of the 3.7 MiB of a
    100,000-clip map (copies the allocator would keep after: the idle app's memory). No per-point
    Python object is made."""
    proj = state.projections[feature_set]
    if feature_set not in state.map_json:
        state.map_json[feature_set] = (f'"ids": {_ids_json(state.store, proj.rows)}, "x": "{_b64(proj.xy[:, 0], "<f4")}", '
                                       f'"y": "{_b64(proj.xy[:, 1], "<f4")}"}}').encode("utf-8")
    all_names, all_codes = colour_codes(state, proj.rows, colour)
    used, codes = np.unique(all_codes, return_inverse=True)  # only the groups on the map, in name order
    names = np.array(all_names, dtype=object)[used]
    order = np.argsort(names.astype(str), kind="stable")
    names, codes = names[order], np.argsort(order)[codes]
    wide = group_dtype(len(names))
    head = json.dumps({"feature_set": feature_set, "method": proj.method, "colour": colour,
                       "groups": names.tolist(), "group_dtype": wide, "n": len(proj.rows)})[:-1]
    shared = memoryview(state.map_json[feature_set])
    return [f'{head}, "group": "{_b64(codes, WIRE_CODES[wide])}", '.encode("utf-8"),
            *(shared[at:at + piece] for at in range(0, len(shared), piece))]


def group_dtype(n_groups: int) -> str:
    """The narrowest wire type of the map's group codes: uint16 holds codes of at most 65,536
    groups; past that (a city or location per clip) uint16 wrapped code 65,536 to 0 and coloured
    those points as the first group, silently. The page reads the type from ``group_dtype``."""
    return "uint16" if n_groups <= 1 << 16 else "uint32"


def _ids_json(store: Any, rows: np.ndarray, block: int = 2048) -> str:
    """The ids of ``rows`` as one JSON string joined by newlines, made from the id column's
    fixed-width text without a Python string per id: each chunk of the column is read once and
    turned into text ``block`` ids at a time. Per-id strings, re-reading a chunk per block, or
    big temporaries all leave the C and Python allocators holding their peak after the map is
    encoded (the idle app's memory; measured in scripts/bench/bench_view.py). Ids that JSON would
    have to escape (a quote, a backslash, a control character; the clip id grammar allows none, a
    hand-made store might) fall back to a JSON list."""
    per = store.arrays.chunk_rows("index/clip_id")
    parts, start = [], 0
    while start < len(rows):
        chunk = int(rows[start]) // per
        stop = start + int(np.argmax(np.append(rows[start:] // per != chunk, True)))  # the run in this chunk
        first = chunk * per
        text = store.arrays.read("index/clip_id", first, min(store.n_clips, first + per))
        for at in range(start, stop, block):
            part = _id_block(text[rows[at:min(stop, at + block)] - first])
            if part is None:
                return json.dumps(store.index.ids_at(rows))
            parts.append(part)
        del text
        start = stop
    return '"' + "\\n".join(parts) + '"'


def _id_block(text: np.ndarray) -> str | None:
    """Fixed-width ids joined by JSON-escaped newlines, or None when an id needs escaping."""
    if text.dtype.kind != "U":
        return None
    codes = np.ascontiguousarray(text).view(np.uint32).reshape(len(text), -1)  # UTF-32, zero-padded
    if ((codes < 32) & (codes != 0)).any() or (codes == 34).any() or (codes == 92).any():
        return None
    width, at = codes.shape[1], np.arange(len(text))
    out = np.zeros((len(text), width + 2), dtype=np.uint32)
    out[:, :width] = codes
    ends = (codes != 0).sum(axis=1)
    out[at, ends], out[at, ends + 1] = 92, 110  # a backslash and an n: JSON's newline between ids
    return out[out != 0][:-2].tobytes().decode("utf-32-le")


def _b64(values: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(values, dtype=dtype).tobytes()).decode("ascii")


def colour_codes(state: ViewState, rows: np.ndarray, colour: str) -> tuple[list[str], np.ndarray]:
    """(group names, the group code of each row) under ``colour`` (see `colour_options`)."""
    if colour in PLAIN_COLOURS:
        names, codes = state.groups(colour)
        return names, codes[rows]
    kind, _, source = colour.partition(":")
    if kind not in ("predicted", "correct") or source not in state.sources:
        raise BadRequest(f"cannot colour by {colour[:80]!r}; choose one of {', '.join(colour_options(state))}")
    pred = predicted_classes(state, source, rows)
    n = len(state.store.classes)
    if kind == "predicted":
        return [*state.store.classes, unclaimed("(not predicted)", state.store.classes)], np.where(pred < 0, n, pred)
    labels = state.labels()[rows]
    codes = np.where(pred == labels, 0, 1)
    codes[(pred < 0) | (labels < 0)] = 2
    return ["right", "wrong", "(no prediction or label)"], codes


def colour_values(state: ViewState, rows: np.ndarray, colour: str) -> np.ndarray:
    """The group name of each row under ``colour`` (for tests: the app sends `colour_codes`)."""
    names, codes = colour_codes(state, rows, colour)
    return np.array(names, dtype=object)[codes]


def predicted_classes(state: ViewState, source: str, rows: np.ndarray) -> np.ndarray:
    """The source's predicted class of each row; -1 where it has no answer."""
    covered = state.covers(source)[rows]
    out = np.full(len(rows), -1, dtype=np.int64)
    if covered.any():
        out[covered] = state.scores(source, state.store.index.ids_at(rows[covered])).argmax(axis=1)
    return out


# ------------------------------------------------------------------------------------ one clip
def clip_page(state: ViewState, clip_id: str, feature_set: str | None) -> dict[str, Any]:
    """Everything the clip page shows (UnknownClipError for an id not in the store)."""
    store = state.store
    row = store.row(clip_id)
    label = int(state.labels()[row])
    splits = [s for s in state.splits if state.in_split(s)[row]]
    return {"clip_id": clip_id, "row": row, "label": store.classes[label] if label >= 0 else None,
            "city": state.value("city", row), "location": state.value("location", row),
            "splits": splits, "no_split": unclaimed("(none)", state.splits),
            "media": {kind: media_note(state, clip_id, kind) for kind in KINDS},
            "frames": frames_source(state, row), "logmel": _first_done(store, state.logmel_sets, row),
            "outputs": clip_outputs(state, clip_id, row), "classes": list(store.classes),
            **_page_neighbours(store, feature_set, clip_id), "feature_set": feature_set}


def _page_neighbours(store: Any, feature_set: str | None, clip_id: str) -> dict[str, Any]:
    """``neighbours`` (None: no set) and ``neighbours_note``: why a clip whose vector search cannot
    use (all zeros, not finite: search's ValueError) has none. The rest of its page is still shown
    (before: the whole page was that one 400 line, its audio and predictions out of reach)."""
    if not feature_set:
        return {"neighbours": None, "neighbours_note": None}
    try:
        return {"neighbours": neighbours(store, feature_set, clip_id), "neighbours_note": None}
    except ValueError as err:
        return {"neighbours": [], "neighbours_note": str(err)}


def media_note(state: ViewState, clip_id: str, kind: str) -> dict[str, Any]:
    """``{"ok": True}`` when the file can be served, else ``{"ok": False, "note": why}``."""
    try:
        media_path(state.store, clip_id, kind, state.attrs, state.value)
        return {"ok": True}
    except (MediaMissing, MediaRefused) as err:
        return {"ok": False, "note": str(err)}


def frames_source(state: ViewState, row: int) -> str | None:
    """Where the frames come from: a stored frames set, ``video`` (decoded), or None."""
    stored = _first_done(state.store, state.frame_sets, row)
    if stored:
        return stored
    return "video" if state.value("video_path", row) else None


def _first_done(store: Any, sets: list[str], row: int) -> str | None:
    return next((name for name in sets if store.done_mask(name)[row]), None)


def clip_outputs(state: ViewState, clip_id: str, row: int) -> dict[str, list[float]]:
    """Clip-level probabilities of every source that covers the clip."""
    out = {}
    for name in state.sources:
        if state.covers(name)[row]:
            out[name] = [float(p) for p in state.scores(name, [clip_id])[0]]
    return out


def neighbours(store: Any, feature_set: str, clip_id: str, k: int = NEIGHBOURS) -> list[dict[str, Any]]:
    """The clip's nearest clips in ``feature_set`` (search's cosine of clip means), with labels.

    Exact search, always: its clip matrix is memory-mapped from search's sidecar (file-backed pages
    the system can drop), where ``auto`` would hold a faiss index of every vector in the app's own
    memory above 24M values; one exact query of 100,000 x 512 stays far inside a page's time."""
    try:
        result = store.search(feature_set, clip_id, k=k, method="exact")
    except MissingFeatureError:
        return []
    return [{"clip_id": c, "score": float(s), "label": lab}
            for c, s, lab in zip(result.clip_ids, result.scores, result.labels)]


# ------------------------------------------------------------------------- confusion, search
def confusion(state: ViewState, source: str, split: str | None) -> dict[str, Any]:
    """Counts ``[true, predicted]`` of a source on a split (clips with a label it covers) and the
    clip ids of every cell, so a click lists them without another request."""
    store = state.store
    if source not in state.sources:
        raise BadRequest(f"no output {source[:80]!r}; the store has {', '.join(state.sources) or 'none'}")
    split = check_split(state, split)
    member = state.in_split(split) if split else np.ones(store.n_clips, dtype=bool)
    labels = state.labels()
    rows = np.flatnonzero(member & (labels >= 0) & state.covers(source))
    pred = predicted_classes(state, source, rows)
    n = len(store.classes)
    counts = np.zeros((n, n), dtype=np.int64)
    np.add.at(counts, (labels[rows], pred), 1)
    ids = store.index.ids_at(rows)
    cells: dict[str, list[str]] = {}
    for i, (t, p) in enumerate(zip(labels[rows], pred)):
        cells.setdefault(f"{t},{p}", []).append(ids[i])
    # no labelled clip (an unlabelled evaluation split): no accuracy, where 0 / 1 read as 0.0%
    accuracy = float(np.trace(counts) / len(rows)) if len(rows) else None
    return {"source": source, "split": split, "classes": list(store.classes), "counts": counts.tolist(),
            "cells": cells, "n": int(len(rows)), "accuracy": accuracy}


def search(state: ViewState, feature_set: str | None, query: str, k: int = SEARCH_K) -> dict[str, Any]:
    """A clip id (that clip and its neighbours) or a sentence (through the set's CLIP text tower)."""
    store = state.store
    query = query.strip()
    if not query:
        raise BadRequest("type a clip id or a sentence")
    if len(query) > MAX_QUERY:
        raise BadRequest(f"the query has {len(query)} characters; at most {MAX_QUERY}")
    if not 1 <= k <= MAX_K:
        raise BadRequest(f"k must be from 1 to {MAX_K}, got {k}")
    if feature_set is None:
        raise BadRequest("the store holds no embedding set to search in")
    if store.index.find([query])[0] >= 0:
        row = store.row(query)
        if not store.done_mask(feature_set)[row]:  # no vector: no self-match of 1.0, no neighbours to list
            raise MissingFeatureError(feature_set, [query])
        label = int(state.labels()[row])
        hits = [{"clip_id": query, "score": 1.0, "label": store.classes[label] if label >= 0 else None},
                *(neighbours(store, feature_set, query, k - 1) if k > 1 else [])]
        return {"query": query, "kind": "clip id", "results": hits, "notes": []}
    from featurestore.text_query import search_text

    result = search_text(store, feature_set, query, k)
    return {"query": query, "kind": f"text ({result.query['encoder']})", "notes": list(result.notes),
            "random_weights": result.random_weights,
            "results": [{"clip_id": c, "score": float(s), "label": lab}
                        for c, s, lab in zip(result.clip_ids, result.scores, result.labels)]}
