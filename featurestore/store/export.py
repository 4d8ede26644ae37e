"""Export a store's index (and, on request, its features) to other tools.

* ``to_pandas(store)``: one row per clip, indexed by ``clip_id``: ``label`` (class name, None when
  unknown), ``label_index`` (-1 when unknown), every index column (``city``, ``location``,
  ``audio_path``, ``video_path``), one bool column per split, and with ``done=True`` one bool column
  ``done:<feature set>`` per feature set.
* ``manifest_records(store, features=...)`` / ``write_manifest(store, path, ...)``: lhotse-style cut
  records (JSON lines), one per clip, each naming where its features are (store location, feature
  set, row, shape) instead of copying them.
* Hugging Face ``datasets``: ``datasets.Dataset.from_dict(index_columns(store))`` for the index (plain
  columns: ``from_pandas`` does not take the categorical label column in every ``datasets`` version);
  for embeddings, ``hf_columns(store, "clip/ViT-B-32")`` gives a dict of columns (clip-level means,
  or every segment with ``level="segment"``) for ``datasets.Dataset.from_dict``. docs/store.md shows both.

pandas is imported when ``to_pandas`` runs (it is a dependency, but nothing else in the store needs it).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from featurestore.atomic_files import atomic_write

_STRING_COLUMNS = ("city", "location", "audio_path", "video_path")


def index_columns(store: Any, done: bool = False) -> dict[str, np.ndarray | list]:
    """The index as plain columns (what ``to_pandas`` wraps): clip_id, label, label_index, ..."""
    classes = store.classes
    labels = np.asarray(store.labels, dtype=np.int64)
    cols: dict[str, Any] = {
        "clip_id": list(store.clip_ids),
        "label": [classes[i] if i >= 0 else None for i in labels],
        "label_index": labels,
    }
    present = set(store.columns())
    for name in _STRING_COLUMNS:
        if name in present:
            cols[name] = [str(v) for v in store.column(name)]
    for split in store.splits():
        cols[split] = np.asarray(store.column(f"split/{split}"), dtype=bool)
    if done:
        for name in store.feature_sets():
            cols[f"done:{name}"] = store.done_mask(name)
    return cols


def to_pandas(store: Any, done: bool = False) -> Any:
    """The index as a ``pandas.DataFrame`` indexed by ``clip_id``.

    Args:
        store: an open `FeatureStore`.
        done: add a ``done:<feature set>`` bool column per feature set.
    """
    try:
        import pandas as pd
    except ImportError as err:  # pragma: no cover - pandas is a dependency
        raise ImportError("to_pandas needs pandas (pip install pandas)") from err
    cols = index_columns(store, done)
    frame = pd.DataFrame(cols).set_index("clip_id")
    frame["label"] = pd.Categorical(frame["label"], categories=store.classes)
    return frame


def manifest_records(store: Any, features: Sequence[str] = (), split: str | None = None) -> Iterator[dict]:
    """lhotse-style cut records, one per clip (of ``split``, or all), in row order.

    Each record: ``id``, ``start`` 0, ``duration`` (segments x segment seconds, when the store
    knows them), ``recording`` (audio/video paths), ``supervisions`` (one, with the label when
    known), ``splits``, and ``features``: per feature set ``{storage_type: "featurestore",
    storage_path, storage_key (the set), row, shape, done}``. Features are referenced, not copied.
    """
    cols = index_columns(store)
    attrs = store.attrs
    seconds = attrs.get("segment_seconds")
    infos = {name: store.feature_info(name) for name in features}  # UnknownFeatureError for a bad name
    done = {name: store.done_mask(name) for name in features}
    wanted = None if split is None else set(store.select(split=split))
    n_seg = attrs.get("audio_segments")
    for row, clip_id in enumerate(cols["clip_id"]):
        if wanted is not None and clip_id not in wanted:
            continue
        label = cols["label"][row]
        duration = float(n_seg * seconds) if n_seg and seconds else None
        yield {
            "id": clip_id,
            "start": 0.0,
            "duration": duration,
            "recording": {k: cols[k][row] or None for k in ("audio_path", "video_path") if k in cols},
            "supervisions": [{"id": clip_id, "start": 0.0, "duration": duration, "label": label,
                              "city": cols.get("city", [None] * (row + 1))[row],
                              "location": cols.get("location", [None] * (row + 1))[row]}],
            "splits": [s for s in store.splits() if cols[s][row]],
            "features": {name: {"storage_type": "featurestore", "storage_path": str(store.location),
                                "storage_key": name, "row": row, "shape": list(info.shape[1:]),
                                "dtype": info.dtype, "done": bool(done[name][row])}
                         for name, info in infos.items()},
        }


def write_manifest(store: Any, path: str | Path, features: Sequence[str] = (), split: str | None = None) -> int:
    """Write ``manifest_records`` as JSON lines (``.jsonl``); returns the number of records.

    Whole or not at all (temp name + rename): a full disk leaves the previous file as it was.
    """
    n = 0
    with atomic_write(path, "w", encoding="utf-8") as f:
        for record in manifest_records(store, features, split):
            f.write(json.dumps(record) + "\n")
            n += 1
    return n


def hf_columns(store: Any, feature_set: str, split: str | None = None, level: str = "clip") -> dict[str, Any]:
    """Columns for ``datasets.Dataset.from_dict``: ``clip_id``, ``label``, and ``embedding``.

    ``level="clip"``: one row per done clip, the mean over its segments (float32 ``[dim]``);
    ``level="segment"``: one row per segment, with a ``segment`` column. Clips not done are left out.
    """
    if level not in ("clip", "segment"):
        raise ValueError(f"level must be 'clip' or 'segment', got {level!r}")
    ids = store.select(split=split) if split is not None else list(store.clip_ids)
    done = store.done_mask(feature_set)[store.rows(ids)]
    ids = [c for c, d in zip(ids, done) if d]
    data = store.get_many(feature_set, ids).astype(np.float32)
    classes, labels = store.classes, np.asarray(store.labels)[store.rows(ids)]
    names = [classes[i] if i >= 0 else None for i in labels]
    if level == "clip":
        return {"clip_id": ids, "label": names, "embedding": list(data.mean(axis=1))}
    n_seg = data.shape[1]
    return {"clip_id": [c for c in ids for _ in range(n_seg)], "label": [n for n in names for _ in range(n_seg)],
            "segment": [s for _ in ids for s in range(n_seg)], "embedding": list(data.reshape(-1, *data.shape[2:]))}
