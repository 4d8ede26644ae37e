"""``read_csv_manifest`` builds its manifest from columns (issue 23): the same clips, classes and
errors as the reader that built a ``ClipRecord`` per row, kept here as the reference."""
from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from featurestore.clip_table import ClipRecord, ClipTable
from featurestore.datasets import csv_manifest
from featurestore.datasets._common import (
    DatasetFormatError,
    check_inside_root,
    checked_clip_id,
    clip_counts,
    read_table,
)
from featurestore.datasets.csv_manifest import _plain_columns, _read_columns, read_csv_manifest
from featurestore.manifest import Manifest, check_classes
from featurestore.store.store import create_store


# ------------------------------------------------------------------ the reader as it was (reference)
def reference_read(path: Path, classes: Sequence[str] | None = None, *, audio_segments: int | None = None,
                   video_frames: int | None = None, allow_outside_root: bool = False) -> Manifest:
    """``read_csv_manifest`` before columns: a dict, a ``ClipRecord`` and the checks per row."""
    table = read_table(path)
    header = [h.lower() for h in table.header or []]
    if "clip_id" not in header or not ({"audio", "video"} & set(header)):
        raise DatasetFormatError(table.path, 1, f"need a clip_id column and an audio and/or video column; "
                                                f"header is {table.header}")
    unknown = [h for h in header if h not in csv_manifest._KNOWN]
    if unknown:
        raise DatasetFormatError(table.path, 1, f"unknown column(s) {unknown}; known: "
                                                f"{', '.join(csv_manifest._KNOWN)}")
    base = table.path.parent.absolute()
    clips, lines = [], {}
    for line, row in table.rows:
        cell = dict(zip(header, row, strict=True))
        clip = ClipRecord(clip_id=cell["clip_id"], audio=Path(cell["audio"]) if cell.get("audio") else None,
                          video=Path(cell["video"]) if cell.get("video") else None, label=cell.get("label") or None,
                          city=cell.get("city", ""), location=cell.get("location", ""),
                          splits=frozenset(s.strip() for s in cell.get("split", "").split(";") if s.strip()))
        checked_clip_id(table.path, line, clip.clip_id)
        if clip.clip_id in lines:
            raise DatasetFormatError(table.path, line, f"clip {clip.clip_id!r} already listed on line "
                                                       f"{lines[clip.clip_id]}")
        lines[clip.clip_id] = line
        for listed in (cell.get("audio", ""), cell.get("video", "")):
            check_inside_root(base, listed, table.path, line, clip.clip_id, allow_outside_root)
        clips.append(clip)
    labels = {c.label for c in clips if c.label is not None}
    if classes is None:
        classes = sorted(labels)
    else:
        classes = check_classes(classes)
        for clip in clips:
            if clip.label is not None and clip.label not in classes:
                raise DatasetFormatError(path, lines[clip.clip_id], f"label {clip.label!r} of clip {clip.clip_id!r} "
                                                                    f"is not one of the classes {classes}")
    audio_segments, video_frames = clip_counts([base], audio_segments, video_frames, default_segments=10,
                                               default_frames=12)
    return Manifest(table.path.stem, classes, clips, base, audio_segments=audio_segments, video_frames=video_frames)


def outcome(read, path: Path, **kwargs) -> tuple:
    """What a reader gives: the manifest's parts (clips as records), or the error's type and text."""
    try:
        m = read(path, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the two readers must fail alike, whatever the error
        return "error", type(exc), str(exc), getattr(exc, "line", None)
    return ("ok", m.name, m.classes, list(m.clips), m.root, m.audio_segments, m.video_frames, m.split_names,
            m.has_media("audio"), m.has_media("video"))


def assert_same(path: Path, **kwargs) -> tuple:
    new, old = outcome(read_csv_manifest, path, **kwargs), outcome(reference_read, path, **kwargs)
    assert new == old
    return new


# ------------------------------------------------------------------ varied files
IDS = ["a", "b-1", "C_2", "x.y", "n+1", "e=mc2", "at@home", "a,b", "café", "ünï-7", "z" * 40]
PATHS = ["audio/{}.wav", "./audio/{}.wav", "audio//{}.wav", "audio/{}.wav/", "audio/./{}.wav", "{}.wav", "a b/{}.wav",
         "", "audio/{}..wav", "..x/{}.wav", "x../{}.wav"]
LABELS = ["dog", "cat", "", "bird song", "Dog"]
SPLITS = ["train", "", "train;test", " train ; test ", "a;;b", "fold1_evaluate;fold1_test", ";"]


def write_csv(path: Path, header: list[str], rows: list[list[str]], rng: random.Random, plain: bool) -> None:
    """Write rows the way people and programs do: commas or tabs, quotes, padding, blank lines,
    CRLF, a BOM, all at random (``plain``: no quotes, padding or blank lines but at the end)."""
    delimiter = "\t" if plain or rng.random() < 0.3 else ","  # plain: no id 'a,b' to quote
    newline = rng.choice(["\n", "\n", "\r\n"])
    quoting = csv.QUOTE_MINIMAL if plain else rng.choice([csv.QUOTE_MINIMAL, csv.QUOTE_MINIMAL, csv.QUOTE_ALL])
    with open(path, "w", newline="", encoding="utf-8-sig" if rng.random() < 0.2 else "utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter, lineterminator=newline, quoting=quoting)
        writer.writerow(header)
        for row in rows:
            if not plain and rng.random() < 0.03:
                f.write(newline)  # a blank line: skipped, the line numbers after it count it
            if not plain and rng.random() < 0.03:
                row = [f" {cell}" if cell else cell for cell in row]  # read_table strips it
            writer.writerow(row)
        f.write(newline * rng.choice([0, 0, 1, 2]))


def varied_file(tmp_path: Path, seed: int, plain: bool = False) -> Path:
    """A valid manifest of 0-30 clips with random columns and cells; ``plain``: one that
    ``_plain_columns`` splits directly (the id first: a line must not start with an empty cell)."""
    rng = random.Random(seed)
    columns = [rng.choice(["audio", "AUDIO", "Audio"])]
    columns += [c for c in ("video", "label", "split", "city", "location") if rng.random() < 0.7]
    columns.insert(0 if plain else rng.randrange(len(columns) + 1), "clip_id")
    n = rng.choice([0, 1, 3, 30])
    ids = rng.sample([f"{rng.choice(IDS[:-3] if plain else IDS)}{i}" for i in range(n)], n)
    rows = []
    for clip_id in ids:
        cell = {"clip_id": clip_id, "label": rng.choice(LABELS), "split": rng.choice(SPLITS[:3] if plain else SPLITS),
                "city": rng.choice(["", "lyon", "paris"]), "location": rng.choice(["", "lyon-1", "paris-2"])}
        for media in ("audio", "video"):
            cell[media] = rng.choice(PATHS).format(clip_id)
        rows.append([cell[c.lower()] for c in columns])
    path = tmp_path / f"clips{seed}.csv"
    write_csv(path, columns, rows, rng, plain)
    return path


@pytest.mark.parametrize("seed", range(60))
def test_a_varied_file_gives_the_records_the_reference_gives(tmp_path, seed):
    path = varied_file(tmp_path, seed)
    result = assert_same(path)
    assert result[0] == "ok", result  # the files are valid: the clips themselves were compared


@pytest.mark.parametrize("seed", range(30))
def test_a_plain_file_gives_the_records_the_reference_gives(tmp_path, seed):
    path = varied_file(tmp_path, seed, plain=True)
    assert _plain_columns(path) is not None  # the direct split, not read_table's rows, was compared
    result = assert_same(path)
    assert result[0] == "ok", result


@pytest.mark.parametrize("seed", range(10))
def test_given_classes_agree_with_the_reference_or_fail_alike(tmp_path, seed):
    path = varied_file(tmp_path, seed)
    assert_same(path, classes=["dog", "cat", "bird song", "Dog"])
    assert_same(path, classes=["dog", "cat"])  # a 'bird song' or 'Dog' clip: refused on its line


def test_the_columns_are_a_clip_table_with_the_records_values(tmp_path):
    path = tmp_path / "clips.csv"
    path.write_text("clip_id,audio,video,label,split\na,a.wav,,dog,train;test\nb,,v/b.mp4,,\n")
    m = read_csv_manifest(path)
    assert isinstance(m.clips, ClipTable)
    assert list(m.clips) == [ClipRecord("a", Path("a.wav"), None, "dog", "", "", frozenset({"train", "test"})),
                             ClipRecord("b", None, Path("v/b.mp4"), None, "", "", frozenset())]
    assert m.split_names == ["test", "train"] and m.classes == ["dog"]


def test_an_empty_media_column_is_no_media_as_with_records(tmp_path):
    path = tmp_path / "clips.csv"
    path.write_text("clip_id,audio,video\na,a.wav,\nb,b.wav,\n")
    assert assert_same(path)[-2:] == (True, False)


# ------------------------------------------------------------------ errors: the first offending row, worded alike
CLEAN = [["c0", "audio/c0.wav", "video/c0.mp4", "dog"], ["c1", "audio/c1.wav", "video/c1.mp4", "cat"],
         ["c2", "audio/c2.wav", "", "dog"], ["c3", "audio/c3.wav", "video/c3.mp4", ""],
         ["c4", "", "video/c4.mp4", "cat"], ["c5", "audio/c5.wav", "video/c5.mp4", "dog"]]
FAULTS = {
    "bad id": lambda row, rows: row.__setitem__(0, ".hidden"),
    "unicode bad id": lambda row, rows: row.__setitem__(0, "café x"),
    "repeat": lambda row, rows: row.__setitem__(0, rows[0][0]),
    "absolute audio": lambda row, rows: row.__setitem__(1, "/etc/passwd"),
    "dotdot audio": lambda row, rows: row.__setitem__(1, "audio/../../x.wav"),
    "dotdot video": lambda row, rows: row.__setitem__(2, ".."),
    "absolute video": lambda row, rows: row.__setitem__(2, "//server/x.mp4"),
    "unknown label": lambda row, rows: row.__setitem__(3, "bird"),
}


def faulty_file(tmp_path: Path, faults: list[tuple[str, int]], blank_line: bool = False) -> Path:
    rows = [list(r) for r in CLEAN]
    for kind, at in faults:
        FAULTS[kind](rows[at], rows)
    lines = ["clip_id,audio,video,label"] + [",".join(r) for r in rows]
    if blank_line:
        lines.insert(2, "")
    path = tmp_path / "clips.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("kind", sorted(FAULTS))
@pytest.mark.parametrize("blank_line", [False, True])
def test_each_fault_is_worded_as_before(tmp_path, kind, blank_line):
    path = faulty_file(tmp_path, [(kind, 4)], blank_line)
    result = assert_same(path, classes=["dog", "cat"])
    assert result[:2] == ("error", DatasetFormatError) and result[3] == 6 + blank_line, result


def test_faults_in_several_rows_report_the_first_row_of_any_kind(tmp_path):
    rng = random.Random(7)
    for _ in range(60):
        faults = [(rng.choice(sorted(FAULTS)), rng.randrange(1, len(CLEAN))) for _ in range(rng.randint(1, 3))]
        path = faulty_file(tmp_path, faults, blank_line=rng.random() < 0.3)
        for kwargs in ({}, {"classes": ["dog", "cat"]}, {"allow_outside_root": True}):
            assert_same(path, **kwargs)


def test_a_later_bad_id_does_not_hide_an_earlier_outside_path(tmp_path):
    path = faulty_file(tmp_path, [("bad id", 5), ("dotdot audio", 2)])
    with pytest.raises(DatasetFormatError, match=r"line 4: clip 'c2': path 'audio/../../x.wav' has a '\.\.'"):
        read_csv_manifest(path)


def test_a_row_with_a_bad_id_and_a_bad_path_reports_the_id(tmp_path):
    path = faulty_file(tmp_path, [("absolute audio", 3), ("bad id", 3)])
    with pytest.raises(DatasetFormatError, match=r"line 5: clip id '\.hidden' starts with '\.'"):
        read_csv_manifest(path)


def test_a_repeat_names_both_lines(tmp_path):
    path = faulty_file(tmp_path, [("repeat", 4)], blank_line=True)
    with pytest.raises(DatasetFormatError, match=r"line 7: clip 'c0' already listed on line 2"):
        read_csv_manifest(path)


def test_outside_paths_are_kept_when_allowed(tmp_path):
    path = faulty_file(tmp_path, [("absolute audio", 1), ("dotdot video", 2)])
    result = assert_same(path, allow_outside_root=True)
    assert result[0] == "ok" and result[3][1].audio == Path("/etc/passwd") and result[3][2].video == Path("..")


def test_a_dotted_name_that_is_no_dotdot_component_is_accepted(tmp_path):
    path = tmp_path / "clips.csv"
    path.write_text("clip_id,audio\na,x..y/a..wav\nb,..b/b..\nc,c../..c\n")
    assert assert_same(path)[0] == "ok"


@pytest.mark.parametrize("text", [
    "clip_id,audio,video\na,a.wav\n",           # a missing field
    "clip_id,audio\na,a.wav,extra\n",           # an extra one
    "clip_id,label\na,dog\n",                   # no media column
    "clip_id,audio,colour\na,a.wav,red\n",      # an unknown column
    "", "\n\n", "clip_id,audio\n",              # empty, blank, header only
    "clip_id,audio\na,a.wav\r\nb,b.wav\rc,c.wav\n",  # a lone carriage return
    "clip_id,audio\n,a.wav\n",                  # an empty id
    "clip_id,audio\n\"a\nb\",a.wav\n",          # an id holding a newline
    "clip_id,audio\na,\"x\n/etc/passwd\"\n",    # a path holding a newline (and a '\n/' when joined)
])
def test_shapes_and_odd_files_fail_or_read_as_before(tmp_path, text):
    path = tmp_path / "clips.csv"
    path.write_text(text, newline="")
    assert_same(path)


@pytest.mark.parametrize("header", ["clip_id,audio,Audio", "clip_id,audio,video,clip_id", "clip_id,audio,label,Label"])
def test_a_column_given_twice_is_refused_naming_it(tmp_path, header):
    """Before: the last of the two was used without a word (the second ``clip_id`` column's ids,
    the last ``label``)."""
    path = tmp_path / "clips.csv"
    n = len(header.split(","))
    path.write_text(header + "\n" + ",".join(["a", "a.wav", "b.mp4", "c"][:n]) + "\n")
    with pytest.raises(DatasetFormatError, match=r"clips.csv.*given more than once"):
        read_csv_manifest(path)


def test_a_field_over_csvs_limit_fails_as_before(tmp_path):
    path = tmp_path / "clips.csv"
    path.write_text("clip_id,audio\na," + "x" * 200 + ".wav\n")
    limit = csv.field_size_limit(100)
    try:
        result = assert_same(path)
    finally:
        csv.field_size_limit(limit)
    assert result[:2] == ("error", csv.Error)


# ------------------------------------------------------------------ the direct split of plain files
def table_columns(path: Path) -> tuple:
    """``read_table``'s rows as columns (or its error)."""
    try:
        table = read_table(path)
    except DatasetFormatError as exc:
        return "error", str(exc)
    rows = [row for _, row in table.rows]
    columns = [list(c) for c in zip(*rows)] if rows else [[] for _ in table.header]
    return table.header, columns, [line for line, _ in table.rows]


def split_columns(path: Path) -> tuple:
    """``_read_columns``'s columns (or its error), as ``table_columns`` gives them."""
    try:
        columns = _read_columns(path)
    except DatasetFormatError as exc:
        return "error", str(exc)
    return columns.header, columns.columns, list(columns.lines)


@pytest.mark.parametrize("text, plain", [
    ("clip_id,audio\na,a.wav\nb,b.wav\n", True),
    ("clip_id,audio\r\na,a.wav\r\nb,b.wav", True),            # CRLF, no final newline
    ("\ufeffclip_id\taudio\na\ta b.wav\n\n\n", True),         # BOM, tabs, a space inside a cell, blank end
    ("clip_id\taudio\tvideo\na\ta.wav\t\n", True),            # a last cell empty: its tab is no padding
    ("clip_id,audio\na,a.wav\n\nb,b.wav\n", False),           # a blank line inside
    ("clip_id,audio\na, a.wav\n", False),                     # a padded cell
    ("clip_id,audio\na,a.wav \n", False),
    ("clip_id,audio\na,\"a.wav\"\n", False),                  # quotes
    ("clip_id,audio\n ,a.wav\n", False),                      # a line starting blank
    ("clip_id,audio\na,a.wav,\n", False),                     # a row of another width
    ("clip_id,audio\né,a.wav\n", False),                      # a line starting outside ASCII: maybe blank
    ("clip_id,audio\na,\x00\n", False),
])
def test_plain_files_are_split_directly_as_csv_reads_them(tmp_path, text, plain):
    path = tmp_path / "clips.csv"
    path.write_bytes(text.encode("utf-8"))
    assert (_plain_columns(path) is not None) == plain
    assert split_columns(path) == table_columns(path)


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("plain", [False, True])
def test_varied_files_split_as_read_table_reads_them(tmp_path, seed, plain):
    path = varied_file(tmp_path, seed, plain)
    assert split_columns(path) == table_columns(path)


def test_a_generated_manifest_is_read_without_read_table(tmp_path, monkeypatch):
    path = tmp_path / "clips.csv"
    path.write_text("clip_id,audio,video,label,split,city,location\n" + "".join(
        f"c{i},audio/c{i}.wav,video/c{i}.mp4,{'ab'[i % 2]},fold1_train,lyon,lyon-{i % 3}\n" for i in range(500)))
    reference = reference_read(path)
    monkeypatch.setattr(csv_manifest, "read_table", None)  # the plain split must not need it
    m = read_csv_manifest(path)
    assert list(m.clips) == reference.clips and m.classes == ["a", "b"]


def test_a_store_from_the_columns_equals_one_from_the_records(tmp_path):
    path = varied_file(tmp_path, 1, plain=True)
    new, old = read_csv_manifest(path), reference_read(path)
    assert len(new) == 30 and len(new.split_names) == 2 and new.has_media("video")
    with create_store(tmp_path / "new.zarr", new) as a, create_store(tmp_path / "old.zarr", old) as b:
        assert a.columns() == b.columns() and a.splits() == b.splits()
        for name in a.columns():
            assert np.array_equal(a.column(name), b.column(name)), name
        for split in a.splits():
            assert a.select(split=split) == b.select(split=split)
