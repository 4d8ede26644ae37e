"""The clips of a store: appending a manifest's clips, selecting them, and the class list.

``FeatureStore.append_clips``, ``select`` and ``set_classes`` delegate here. The index they write
and read (ids, the id -> row lookup, columns) is ``ClipIndex`` (``index.py``).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from featurestore.clip_table import ClipTable, joined_if_kept_by_path
from featurestore.errors import UnknownValueError
from featurestore.manifest import Manifest, check_classes
from featurestore.store._backend import join
from featurestore.store.index import equal_key_runs
from featurestore.store.layout import INDEX_CHUNK_ROWS
from featurestore.store.row_group import PREDICTION_RUNS

if TYPE_CHECKING:
    from featurestore.store.store import FeatureStore


def append_clips(store: FeatureStore, manifest: Manifest) -> None:
    """See ``FeatureStore.append_clips``."""
    arrays = store.arrays
    arrays.require_writable()
    attrs = store.attrs
    classes = list(manifest.classes) or list(attrs.get("classes", []))  # unlabelled clips keep the store's
    if attrs.get("classes") and list(attrs["classes"]) != classes:
        raise ValueError(f"{store.location}: classes {attrs['classes']} differ from the manifest's "
                         f"{manifest.classes}")
    given = ClipTable.of(manifest.clips)  # the clips as columns, once (records: one pass per attribute)
    new_ids = given.clip_id.tolist()
    start, n_new = store.n_clips, len(given)
    table = store.index.append_table(new_ids, start)  # every row's key, sorted: a repeated id sits by its twin
    shared = equal_key_runs(table)
    _refuse_repeats(store, new_ids, table, shared, start)
    end = start + n_new
    described = {"dataset": manifest.name, "dataset_root": str(manifest.root) if manifest.root else "",
                 "audio_segments": manifest.audio_segments, "segment_seconds": manifest.segment_seconds,
                 "video_frames": manifest.video_frames}
    first = described if start == 0 else {}
    added = {**described, "rows": [start, end]}
    columns, cities = _manifest_columns(manifest, given, new_ids)  # before any write: an unknown label is refused
    stored_splits = store.splits()
    members = _split_members(given, stored_splits)
    new_splits = [s for s in members if s not in stored_splits]
    for split in new_splits:
        arrays.create_array(f"index/split/{split}", (start,), "bool", INDEX_CHUNK_ROWS, False)
    for path in row_arrays(store):
        arrays.resize(path, end)
    for name, values in columns.items():
        arrays.write(f"index/{name}", start, values)
    for split, member in members.items():
        if split in new_splits and start:
            member = np.concatenate([np.zeros(start, dtype=bool), member])  # earlier rows: written too
        arrays.write(f"index/split/{split}", end - len(member), member)
    # ids sharing a key that are not repeats (practically never): no lookup, ids found by the id column
    looked_up = store.index.prepare_append(table, cities, start, bool(shared))
    # the commit point, one attribute update (the lookup's name included): a kill before it leaves
    # rows past n_clips and an unnamed lookup, which the next writable open removes
    # (roll_back_partial_append)
    arrays.set_attrs("", {"classes": classes, **first, "n_clips": end, **looked_up,
                          "datasets": [*attrs.get("datasets", []), added]})
    store.index.forget()
    store.index.drop_unused()
    store._rows_cache.drop_done()


def _refuse_repeats(store: FeatureStore, new_ids: list[str], table: np.ndarray, runs: list[tuple[int, int]],
                    start: int) -> None:
    """ValueError naming new ids already in the store or given twice. ``runs``: the runs of equal keys
    in ``table`` (the lookup of every row, old and new: ``ClipIndex.append_table``), each confirmed on
    the ids themselves, as ids sharing a key are not necessarily equal (practically never at 128 bits)."""
    if not runs:
        return
    rows = np.concatenate([table[a:b, 2] for a, b in runs]).astype(np.int64)
    ids = store.index.ids_at(rows[rows < start]) + [new_ids[r - start] for r in rows[rows >= start].tolist()]
    dup = sorted(cid for cid, n in Counter(ids).items() if n > 1)
    if dup:
        raise ValueError(f"clip ids must be unique; already present or repeated: {dup[:5]}")


def roll_back_partial_append(store: FeatureStore) -> None:
    """Cut arrays that an append killed before its commit left longer than the index.

    ``append_clips`` grows every row array and writes the new index rows before it commits the
    new row count, so a killed append leaves only rows past ``n_clips``; dropping them restores
    the store as it was before, and rerunning the append then ends as a clean run would.
    """
    n = store.committed_rows
    for path in row_arrays(store):
        if store.arrays.shape(path)[0] > n:
            store.arrays.resize(path, n)
    store.index.drop_unused()  # a lookup written for the rows cut off


def row_arrays(store: FeatureStore) -> list[str]:
    """Every array whose first axis is the clip axis."""
    paths = [f"index/{c}" for c in store.columns()]
    for group in store.row_groups():
        paths += group.array_paths
    return [p for p in paths if store.arrays.is_array(p)]  # a creation killed midway has only some


def select(store: FeatureStore, split: str | Sequence[str] | None = None,
           label: str | int | Sequence | None = None, city: str | Sequence[str] | None = None,
           location: str | Sequence[str] | None = None) -> list[str]:
    """See ``FeatureStore.select``."""
    keep = np.ones(store.n_clips, dtype=bool)
    if split is not None:
        any_split = np.zeros(store.n_clips, dtype=bool)
        for s in as_list(split):
            if s not in store.splits():
                raise UnknownValueError("split", s, store.splits())
            any_split |= store.column(f"split/{s}").astype(bool)
        keep &= any_split
    if label is not None:
        wanted = [_label_index(store.classes, v) for v in as_list(label)]
        keep &= np.isin(store.labels, wanted)
    for name, value in (("city", city), ("location", location)):
        if value is not None:
            column = store.column(name)
            present = set(column.tolist())
            for v in as_list(value):
                if v not in present:
                    raise UnknownValueError(name, v, present - {""})
            keep &= np.isin(column, as_list(value))
    return store.index.ids_at(np.flatnonzero(keep))


def _label_index(classes: list[str], label: str | int) -> int:
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        if not -1 <= int(label) < len(classes):
            raise UnknownValueError("label", int(label), classes,
                                    f"An integer label is an index 0..{len(classes) - 1} (-1: no label).")
        return int(label)
    if label not in classes:
        raise UnknownValueError("label", label, classes)
    return classes.index(label)


def set_classes(store: FeatureStore, classes: Sequence[str]) -> None:
    """See ``FeatureStore.set_classes``."""
    store.arrays.require_writable()
    names = check_classes(classes)
    current = store.classes
    if current == names:
        return
    if current:
        raise ValueError(f"{store.location}: the store already has classes {current}; refusing to replace "
                         f"them with {names} (labels, predictions and class features use that order)")
    for group in store.row_groups(PREDICTION_RUNS):
        group.delete()
    for name in store.class_feature_sets():
        store.arrays.delete(join("class_features", name))
    store._runs = None
    store.arrays.set_attrs("", {"classes": names})


def require_classes(store: FeatureStore, what: str) -> None:
    """Per-class arrays need a class list; a store made from unlabelled clips has none yet."""
    if not store.classes:
        raise ValueError(f"{store.location}: {what} needs the store's classes, and it has none (made from a "
                         f"manifest without labels); give them first: store.set_classes([...]) or "
                         f"featurestore extract --classes A,B,C")


def check_id_sequence(method: str, clip_ids: Any, single: str = "") -> None:
    """A str or bytes where many clip ids are expected would be iterated character by character
    (and fail as "unknown clip 'o'", or worse, match one-letter ids): refuse it in one line."""
    if isinstance(clip_ids, (str, bytes)):
        shown = repr(clip_ids) if len(clip_ids) <= 60 else f"{clip_ids[:57]!r}..."
        instead = f", or use {single} for one clip" if single else ""
        raise TypeError(f"{method}: expected a list of clip ids, got the {type(clip_ids).__name__} {shown}; "
                        f"pass a list ([{shown}]){instead}")


def as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple, set, np.ndarray)) else [value]


def _manifest_columns(manifest: Manifest, table: ClipTable,
                      clip_ids: list[str]) -> tuple[dict[str, np.ndarray], set[str]]:
    """The index columns of a manifest's clips (``table``: them as columns) and their distinct cities."""
    n = len(table)
    texts = {"city": table.city, "location": table.location}
    # (a list of an object array is a C loop; iterating the array itself costs a call per item)
    distinct_cities = set(table.city.tolist())  # a few: checked instead of every city, and the summary's values
    checked = {"city": distinct_cities, "location": table.location.tolist()}
    for media in ("audio", "video"):
        paths = getattr(table, media)
        if paths is not None:
            texts[f"{media}_path"] = _stored_paths(paths, manifest.root)
            checked[f"{media}_path"] = texts[f"{media}_path"].tolist()
        else:  # no media paths (a store of features made elsewhere): one '' seen n times, not n of them
            texts[f"{media}_path"] = np.broadcast_to(np.array("", dtype=object), (n,))
    labels = _label_column(manifest, table.label)  # before any text is checked: an unknown label is refused first
    for name, values in checked.items():
        _require_storable(manifest, clip_ids, name, texts[name], values)
    return {"clip_id": table.clip_id, "label": labels, **texts}, distinct_cities


def _label_column(manifest: Manifest, labels: np.ndarray) -> np.ndarray:
    """Each clip's label index (-1: no label), one dict lookup per clip; an unknown label is refused
    as ``Manifest.label_index`` words it (the first in sorted order)."""
    label_of: dict[str | None, int] = {name: i for i, name in enumerate(manifest.classes)}
    label_of[None] = -1
    try:
        return np.fromiter(map(label_of.__getitem__, labels.tolist()), dtype=np.int16, count=len(labels))
    except KeyError:
        unknown = set(labels.tolist()) - set(label_of)
        manifest.label_index(sorted(unknown, key=str)[0])
        raise


def _require_storable(manifest: Manifest, clip_ids: list[str], name: str, column: Sequence[str],
                      values: Iterable[str]) -> None:
    """ValueError naming the first clip whose ``name`` text cannot be stored, before anything is
    written: one that is not UTF-8 (a media path in a folder whose name is not: Python decodes it
    with lone surrogates; the strings' encoding failed half-way through the append, with a bare
    UnicodeEncodeError), or one holding a NUL (texts are read back as numpy strings, which drop
    trailing NULs: "x\\0" would come back as "x"). ``values``: the column's texts, or its distinct
    values where they are known (fewer to check)."""
    joined = "".join(values)  # one pass over the column; ASCII (the usual case) needs no encoding
    if "\x00" in joined:
        i = next(i for i, text in enumerate(column) if "\x00" in text)
        raise ValueError(f"dataset {manifest.name!r}, clip {clip_ids[i]!r}: its {name} {column[i]!r} holds a NUL "
                         f"character, which the store cannot keep (texts are read back without trailing NULs)")
    if joined.isascii():
        return
    try:
        joined.encode("utf-8")
    except UnicodeEncodeError:
        i = next(i for i, text in enumerate(column) if not _is_utf8(text))
        raise ValueError(f"dataset {manifest.name!r}, clip {clip_ids[i]!r}: its {name} {column[i]!r} is not "
                         f"valid UTF-8 (a file or folder name in another encoding); rename it") from None


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _stored_paths(paths: np.ndarray, root: Path | None) -> np.ndarray:
    """Media paths as stored: relative to the manifest's root where under it, '' where absent.

    Texts that ``Path`` would keep as they are (the usual case: clean relative paths from a table)
    are taken without a ``Path`` each (~5 us a clip); anything else goes through ``Path`` one by one,
    so both give the same text."""
    given = paths.tolist()
    texts = [p for p in given if p is not None]
    joined = joined_if_kept_by_path(texts)
    if joined is not None:
        if root is None:
            return np.array(["" if p is None else p for p in given], dtype=object)
        prefix = root.as_posix().rstrip("/") + "/"
        if prefix not in joined and root.as_posix() not in texts:  # nothing under the root: kept as given
            return np.array(["" if p is None else p for p in given], dtype=object)
    return np.array(["" if p is None else _stored_path(Path(p), root) for p in given], dtype=object)


def _stored_path(path: Path, root: Path | None) -> str:
    return (path.relative_to(root) if root is not None and path.is_relative_to(root) else path).as_posix()


def _split_members(table: ClipTable, stored: Sequence[str]) -> dict[str, np.ndarray]:
    """Membership (bool per clip) of every split the clips name or the store has (``stored``), in
    name order."""
    none = np.zeros(len(table), dtype=bool)
    return {split: table.splits.get(split, none) for split in sorted({*table.splits, *stored})}
