"""The plan's media paths: every store row's absolute path, the usual case without a ``Path`` per clip.

``resolved_paths`` must give exactly what ``resolve_path`` gives one path at a time (the paths that
``check_files`` checked), for clean texts, ``Path`` objects, absolute paths, missing entries and every
spelling ``Path`` would change; ``joined_if_kept_by_path`` may refuse a clean text (the slow path is
then taken) but must never accept one that ``Path`` changes.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from featurestore import ClipRecord, Manifest
from featurestore.clip_table import joined_if_kept_by_path
from featurestore.extract import plan as plan_module
from featurestore.extract.plan import _by_row, resolve_path, resolved_paths

ODD = ["a/b.wav", "/abs/x.wav", "./a", "a//b", "a/", "..", "a/../b", ".", "", None, Path("p/q.wav"), Path("/r/s"),
       Path(""), "é/ü.wav", "x\ny", "//srv/a"]
CLEAN = ["a/b.wav", "/abs/x.wav", "a/../b", "é/ü.wav", "audio/c1.wav", None]


@pytest.mark.parametrize("root", [None, Path("/data/tau"), Path("rel/dir"), Path("/")])
@pytest.mark.parametrize("column", [ODD, CLEAN, [Path("p/q.wav"), None, Path("/r")], []])
def test_resolved_paths_equal_resolve_path_one_by_one(root, column):
    paths = np.empty(len(column), dtype=object)
    paths[:] = column
    assert resolved_paths(paths, root) == [resolve_path(p, root) for p in column]


def test_clean_texts_take_no_path_each(monkeypatch):
    monkeypatch.setattr(plan_module, "resolve_path", lambda *a: pytest.fail("a Path per clip on clean texts"))
    paths = np.array([f"audio/c{i}.wav" for i in range(1000)] + [None], dtype=object)
    got = resolved_paths(paths, Path("/data/tau"))
    assert got[:2] == ["/data/tau/audio/c0.wav", "/data/tau/audio/c1.wav"] and got[-1] == ""


def test_no_text_that_path_changes_is_taken_as_kept():
    """Every text of up to 5 characters from 'a', '/' and '.', alone and among others."""
    for n in range(1, 6):
        for text in map("".join, itertools.product("a/.", repeat=n)):
            changed = Path(text).as_posix() != text
            if changed:
                assert joined_if_kept_by_path([text]) is None, text
                assert joined_if_kept_by_path(["x", text, "/y"]) is None, text


def test_paths_go_to_their_store_rows():
    assert _by_row(["/a", "/b"], np.array([3, 0]), 5) == ["/b", "", "", "/a", ""]
    assert _by_row([], np.array([], dtype=np.intp), 3) == ["", "", ""]


def test_a_plan_of_records_and_one_of_columns_have_the_same_paths(tmp_path):
    from featurestore import create_store
    from featurestore.extract.plan import make_plan

    ids = [f"c{i}" for i in range(6)]
    audio = [f"audio/{c}.wav" for c in ids]
    video = [None, "video/c1.mp4", "/elsewhere/c2.mp4", None, "video/c4.mp4", "video/c5.mp4"]
    records = Manifest("m", ["a"], [ClipRecord(c, Path(a), None if v is None else Path(v), "a")
                                    for c, a, v in zip(ids, audio, video)], root=tmp_path)
    columns = Manifest.from_columns("m", ["a"], ids, label=["a"] * 6, audio=audio, video=video, root=tmp_path)
    with create_store(tmp_path / "s.zarr", records) as store:
        rows = np.array([5, 4, 3, 2, 1, 0])  # the manifest's clips at other rows than their order
        plans = [make_plan(store, m, rows, np.ones(6, dtype=bool), [], "cpu", 4, None, False)
                 for m in (records, columns)]
    assert plans[0].audio_paths == plans[1].audio_paths and plans[0].video_paths == plans[1].video_paths
    assert plans[0].audio_paths[5] == str(tmp_path / "audio" / "c0.wav") and plans[0].video_paths[3] == "/elsewhere/c2.mp4"
    assert plans[0].video_paths[5] == "" and plans[0].video_paths[2] == ""
