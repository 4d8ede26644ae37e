"""The clip id grammar (docs/store.md, "Clip ids"): every reader and every Manifest refuse an id that
some consumer would change or misread, in one line naming the file, the line and the id; real
TAU, evaluation, demo and CSV ids pass."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from featurestore.clip_table import ClipRecord
from featurestore.datasets import DatasetFormatError, open_dataset, read_csv_manifest, read_tau, read_tau_eval
from featurestore.manifest import Manifest, check_clip_id

ROOT = Path(__file__).resolve().parents[2]
TAU_HEADER = "filename_audio\tfilename_video\tscene_label\tidentifier\n"

#: (kind, the id as a CSV cell, the id the reader sees, what the message says)
BAD = [
    ("newline", '"new\nline"', "new\nline", r"holds '\n'"),
    ("carriage return", '"new\rline"', "new\rline", r"holds '\r'"),
    ("tab", '"a\tb"', "a\tb", r"holds '\t'"),
    ("space", "a b", "a b", "holds ' '"),
    ("slash", "a/b", "a/b", "holds '/'"),
    ("backslash", "a\\b", "a\\b", r"holds '\\'"),
    ("dot dot", "a..b", "a..b", "holds '..'"),
    ("only dot dot", "..", "..", "starts with '.'"),
    ("leading dot", ".hidden", ".hidden", "starts with '.'"),
    ("leading dash", "-rf", "-rf", "starts with '-'"),
    ("control", "a\x0cb", "a\x0cb", r"holds '\x0c'"),
    ("nul-like escape", "a\x1bb", "a\x1bb", r"holds '\x1b'"),
    ("quote", '"a""b"', 'a"b', "holds '\"'"),
    ("too long", "x" * 5000, "x" * 5000, "has 5000 characters"),
]


def _csv(tmp_path: Path, cell: str) -> Path:
    path = tmp_path / "clips.csv"
    path.write_text(f"clip_id,audio\nc1,c1.wav\n{cell},c2.wav\nc3,c3.wav\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("kind, cell, clip_id, why", BAD, ids=[b[0] for b in BAD])
def test_a_csv_manifest_refuses_a_bad_id_naming_the_file_line_and_id(tmp_path, kind, cell, clip_id, why):
    path = _csv(tmp_path, cell)
    with pytest.raises(DatasetFormatError) as err:
        read_csv_manifest(path)
    message = str(err.value)
    assert err.value.path == path and err.value.line == 3
    assert message.startswith(f"{path}, line 3: clip id {repr(clip_id[:60])}") and why in message
    assert "\n" not in message and len(message) < 400  # one line, the id shown cut


def test_a_quoted_newline_is_no_longer_silently_dropped(tmp_path):
    """Before: the CSV was split into lines first and 'new\\nline' came back as 'newline'."""
    with pytest.raises(DatasetFormatError, match=r"clip id 'new\\nline'"):
        open_dataset(_csv(tmp_path, '"new\nline"'))


def test_lines_after_a_quoted_newline_keep_their_numbers(tmp_path):
    path = tmp_path / "clips.csv"
    path.write_text('clip_id,audio,label\nc1,c1.wav,"two\nlines"\nc1,c2.wav,a\n', encoding="utf-8")
    with pytest.raises(DatasetFormatError, match="line 4: clip 'c1' already listed on line 2"):
        read_csv_manifest(path)


def _tau(root: Path, audio_name: str) -> Path:
    root.mkdir()
    rows = ["audio/airport-lisbon-1-104.wav\tvideo/airport-lisbon-1-104.mp4\tairport\tlisbon-1\n",
            f'"audio/{audio_name}"\t""\tbus\tlisbon-2\n']
    (root / "meta.csv").write_text(TAU_HEADER + "".join(rows), encoding="utf-8")
    (root / "audio").mkdir()
    return root


@pytest.mark.parametrize("name, shown", [
    ("bus-lis\nbon-2-1.wav", r"'bus-lis\nbon-2-1'"),
    ("bus-lis\tbon-2-1.wav", r"'bus-lis\tbon-2-1'"),
    ("bus-lis bon-2-1.wav", "'bus-lis bon-2-1'"),
    ("bus..x-lisbon-2-1.wav", "'bus..x-lisbon-2-1'"),
    ("x" * 5000 + ".wav", "'" + "x" * 60 + "'..."),
])
def test_tau_meta_csv_refuses_a_bad_id_naming_the_file_line_and_id(tmp_path, name, shown):
    root = _tau(tmp_path / "tau", name)
    with pytest.raises(DatasetFormatError) as err:
        read_tau(root)
    assert err.value.path == root / "meta.csv" and err.value.line == 3
    assert f"clip id {shown}" in str(err.value) and "\n" not in str(err.value)


def test_tau_evaluation_listing_refuses_a_file_whose_stem_is_no_clip_id(tmp_path):
    root = tmp_path / "eval"
    (root / "audio").mkdir(parents=True)
    for name in ("0.wav", "1.wav", "bad name.wav"):
        (root / "audio" / name).write_bytes(b"")
    with pytest.raises(DatasetFormatError) as err:
        read_tau_eval(root)
    assert err.value.path == root / "audio" / "bad name.wav" and "clip id 'bad name' holds ' '" in str(err.value)


def test_real_ids_pass(tmp_path):
    for good in ("airport-lisbon-1-104", "street_pedestrian-vienna-165-4983", "0", "123", "c1",
                 "clip.v2", "a+b=c@d,e", "München-1", "_x"):
        assert check_clip_id(good) == good
    assert check_clip_id("x" * 255)
    root = tmp_path / "tau"
    root.mkdir()
    (root / "meta.csv").write_text(TAU_HEADER + "audio/airport-lisbon-1-104.wav\tvideo/airport-lisbon-1-104.mp4\t"
                                   "airport\tlisbon-1\n", encoding="utf-8")
    assert read_tau(root).clip_ids == ["airport-lisbon-1-104"]


def test_the_demo_dataset_ids_pass(tmp_path):
    from featurestore.demo import make_demo_dataset

    root = make_demo_dataset(tmp_path / "demo", clips_per_class=1, duration=1.0, width=32, height=32, fps=5,
                             progress=False)
    manifest = open_dataset(root)
    assert len(manifest) >= 2 and all(check_clip_id(c) for c in manifest.clip_ids)


@pytest.mark.parametrize("bad", ["new\nline", "a/b", "..", "", "x" * 256, 7])
def test_a_manifest_built_in_code_refuses_a_bad_id(bad):
    with pytest.raises(ValueError, match=r"dataset 'toy', clip 1: clip id"):
        Manifest("toy", [], [ClipRecord("ok"), ClipRecord(bad)])


def test_extract_refuses_a_bad_id_before_creating_any_store(tmp_path):
    dataset = tmp_path / "ds"
    dataset.mkdir()
    _csv(dataset, '"new\nline"')
    store = tmp_path / "out.zarr"
    done = subprocess.run([sys.executable, "-m", "featurestore", "extract", str(dataset / "clips.csv"), str(store),
                           "--encoders", "logmel", "--classes", "a,b"],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "line 3: clip id 'new\\nline'" in lines[0]
    assert not store.exists()


def test_crlf_files_read_as_before(tmp_path):
    path = tmp_path / "clips.csv"
    path.write_bytes(b"clip_id,audio,label\r\nc1,c1.wav,a\r\n\r\nc2,c2.wav,b\r\nc1,c3.wav,a\r\n")
    with pytest.raises(DatasetFormatError, match="line 5: clip 'c1' already listed on line 2"):
        read_csv_manifest(path)
    path.write_bytes(b"clip_id,audio,label\r\nc1,c1.wav,a\r\nc2,c2.wav,b\r\n")
    manifest = read_csv_manifest(path)
    assert manifest.clip_ids == ["c1", "c2"] and manifest.classes == ["a", "b"]
    assert [str(c.audio) for c in manifest.clips] == ["c1.wav", "c2.wav"]
