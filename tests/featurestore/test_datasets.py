"""Dataset readers: TAU development/evaluation layouts, CSV manifests, auto-detection, file checks."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tests.featurestore.test_extract_support import FAST

from featurestore import TAU_CLASSES, ClipRecord, Manifest
from featurestore.datasets import (
    DatasetFormatError,
    MissingFilesError,
    check_files,
    locate_tau,
    open_dataset,
    read_csv_manifest,
    read_tau,
    read_tau_eval,
)
from featurestore.decode import load_audio_segments
from featurestore.demo import make_demo_dataset, make_demo_eval_dataset
from featurestore.extract import extract
from featurestore.store import open_store

META_HEADER = "filename_audio\tfilename_video\tscene_label\tidentifier"
FOLD_HEADER = "filename_audio\tfilename_video\tscene_label"


def _meta_row(clip_id: str, label: str | None = None, identifier: str | None = None) -> str:
    scene, city, loc, _ = clip_id.split("-")
    return (f"audio/{clip_id}.wav\tvideo/{clip_id}.mp4\t{label or scene}\t"
            f"{identifier or f'{city}-{loc}'}")


def _fake_tau(root: Path, ids: list[str], folds: dict[str, list[str]] | None = None,
              meta_dir: Path | None = None, media: bool = True) -> Path:
    """A TAU-layout directory with empty media files (readers only look at names)."""
    meta_dir = meta_dir or root
    (meta_dir / "evaluation_setup").mkdir(parents=True, exist_ok=True)
    (meta_dir / "meta.csv").write_text("\n".join([META_HEADER] + [_meta_row(i) for i in ids]) + "\n")
    for name, members in (folds or {}).items():
        rows = [f"audio/{i}.wav\tvideo/{i}.mp4\t{i.split('-')[0]}" for i in members]
        (meta_dir / "evaluation_setup" / f"{name}.csv").write_text("\n".join([FOLD_HEADER] + rows) + "\n")
    if media:
        for sub, ext in (("audio", "wav"), ("video", "mp4")):
            (root / sub).mkdir(parents=True, exist_ok=True)
            for i in ids:
                (root / sub / f"{i}.{ext}").write_bytes(b"")
    return root


IDS = ["airport-london-6-257", "bus-lisbon-1-10", "tram-vienna-3-99", "park-london-2-4"]


# ------------------------------------------------------------------------------ TAU development


def test_read_tau_on_the_tiny_demo_dataset(tiny_dataset):
    m = read_tau(tiny_dataset)
    assert len(m) == 20 and m.classes == list(TAU_CLASSES)
    assert (m.audio_segments, m.segment_seconds, m.video_frames) == (10, 1.0, 12)
    assert m.split_names == ["fold1_evaluate", "fold1_test", "fold1_train"]
    assert m.root == tiny_dataset.absolute() and m.name == "demo-development"
    clip = m.clips[0]
    assert clip.clip_id == "airport-barcelona-1-100" and clip.audio == Path("audio/airport-barcelona-1-100.wav")
    assert (clip.label, clip.city, clip.location) == ("airport", "barcelona", "barcelona-1")
    check_files(m)  # every path resolves against root
    train = {c.location for c in m.clips if "fold1_train" in c.splits}
    evaluate = {c.location for c in m.clips if "fold1_evaluate" in c.splits}
    assert train and evaluate and not train & evaluate
    assert all(("fold1_test" in c.splits) == ("fold1_evaluate" in c.splits) for c in m.clips)


def test_every_fold_file_becomes_a_split_and_ids_parse(tmp_path):
    root = _fake_tau(tmp_path / "TAU-urban-audio-visual-scenes-2021-development", IDS,
                     {"fold1_train": IDS[:2], "fold1_evaluate": IDS[2:], "fold2_train": IDS[1:3]})
    m = read_tau(root)
    assert m.name == "TAU-urban-audio-visual-scenes-2021-development"
    assert m.clip_ids == IDS
    by_id = {c.clip_id: c for c in m.clips}
    assert by_id["bus-lisbon-1-10"].splits == {"fold1_train", "fold2_train"}
    assert by_id["park-london-2-4"].splits == {"fold1_evaluate"}
    assert (by_id["tram-vienna-3-99"].city, by_id["tram-vienna-3-99"].location) == ("vienna", "vienna-3")


@pytest.mark.parametrize("where", ["development", "meta", "parent"])
def test_metadata_in_a_sibling_meta_directory_is_found(tmp_path, where):
    dev = tmp_path / "TAU-urban-audio-visual-scenes-2021-development"
    meta = tmp_path / "TAU-urban-audio-visual-scenes-2021-development.meta"
    _fake_tau(dev, IDS, {"fold1_train": IDS}, meta_dir=meta)
    given = {"development": dev, "meta": meta, "parent": tmp_path}[where]
    layout = locate_tau(given)
    assert layout.meta_csv == meta / "meta.csv" and layout.media_dir == dev
    assert "meta.csv at" in layout.describe() and "fold1_train.csv" in layout.describe()
    m = read_tau(given)
    assert m.root == dev and m.name == dev.name and len(m) == 4
    check_files(m)


def test_headerless_fold_file_is_accepted(tmp_path):
    root = _fake_tau(tmp_path / "d", IDS)
    (root / "evaluation_setup" / "fold1_train.csv").write_text(
        "".join(f"audio/{i}.wav\t{i.split('-')[0]}\n" for i in IDS[:3]))
    m = read_tau(root)
    assert [c.clip_id for c in m.clips if "fold1_train" in c.splits] == IDS[:3]


def _write_meta(root: Path, lines: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "meta.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("bad_row, message", [
    (_meta_row("airport-london-6-257", label="beach"), "unknown scene label 'beach'"),
    (_meta_row("airport-london-6-257", label="bus"), "says scene 'airport' but scene_label is 'bus'"),
    (_meta_row("airport-london-6-257", identifier="london-7"), "identifier 'london-7' does not match"),
    ("audio/airport-london.wav\tvideo/airport-london.mp4\tairport\tlondon-6", "not scene-city-locationID"),
    ("audio/airport-london-6-1.wav\tvideo/airport-london-6-2.mp4\tairport\tlondon-6", "name different clips"),
    (_meta_row("bus-lisbon-1-10"), "already listed on line 2"),
    ("audio/airport-london-6-257.wav\tairport", "expected 4 tab-separated fields"),
])
def test_bad_meta_rows_are_errors_naming_file_and_line(tmp_path, bad_row, message):
    root = _write_meta(tmp_path / "d", [META_HEADER, _meta_row("bus-lisbon-1-10"), bad_row])
    with pytest.raises(DatasetFormatError) as err:
        read_tau(root)
    assert err.value.path == root.absolute() / "meta.csv" and err.value.line == 3
    assert message in str(err.value) and "meta.csv, line 3" in str(err.value)


def test_meta_without_required_column_is_an_error(tmp_path):
    root = _write_meta(tmp_path / "d", ["filename_audio\tfilename_video\tlabel", "a.wav\ta.mp4\tbus"])
    with pytest.raises(DatasetFormatError, match="missing column scene_label"):
        read_tau(root)


def test_fold_file_naming_an_unknown_clip_or_another_label_is_an_error(tmp_path):
    root = _fake_tau(tmp_path / "d", IDS)
    fold = root / "evaluation_setup" / "fold1_train.csv"
    fold.write_text(f"{FOLD_HEADER}\naudio/{IDS[0]}.wav\tvideo/{IDS[0]}.mp4\tairport\n"
                    "audio/bus-paris-1-1.wav\tvideo/bus-paris-1-1.mp4\tbus\n")
    with pytest.raises(DatasetFormatError, match=r"fold1_train.csv, line 3: clip 'bus-paris-1-1' is not listed"):
        read_tau(root)
    fold.write_text(f"{FOLD_HEADER}\naudio/{IDS[1]}.wav\tvideo/{IDS[1]}.mp4\ttram\n")
    with pytest.raises(DatasetFormatError, match="labelled 'tram' here but 'bus' in meta.csv"):
        read_tau(root)


def test_no_meta_csv_says_where_it_looked(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no meta.csv found.*looked in"):
        read_tau(tmp_path / "empty")


# ------------------------------------------------------------------------------ TAU evaluation


def test_read_tau_eval_from_split_file(tiny_eval_dataset):
    m = read_tau_eval(tiny_eval_dataset)
    assert m.clip_ids == ["0", "1", "2", "3", "4", "5"]
    assert (m.audio_segments, m.video_frames) == (1, 5)
    assert all(c.label is None and c.splits == {"fold1_test"} for c in m.clips)
    assert m.clips[3].audio == Path("audio/3.wav") and m.clips[3].video == Path("video/3.mp4")
    check_files(m)


def test_read_tau_eval_from_directory_listing_sorts_ids_numerically(tmp_path):
    root = tmp_path / "eval"
    for sub, ext in (("audio", "wav"), ("video", "mp4")):
        (root / sub).mkdir(parents=True)
        for i in (0, 1, 2, 10, 11):
            (root / sub / f"{i}.{ext}").write_bytes(b"x")
    (root / "video" / "10.mp4").unlink()
    m = read_tau_eval(root)
    assert m.clip_ids == ["0", "1", "2", "10", "11"] and m.split_names == []
    assert m.clips[3].video == Path("video/10.mp4")  # expected path even though it is missing
    with pytest.raises(MissingFilesError) as err:
        check_files(m)
    assert err.value.paths == [root.absolute() / "video" / "10.mp4"]


# ------------------------------------------------------------------------------ CSV manifests


def test_csv_manifest_paths_classes_and_splits(tmp_path):
    (tmp_path / "sub").mkdir()
    csv = tmp_path / "sub" / "mine.csv"
    csv.write_text("clip_id,audio,video,label,split,location\n"
                   "a,a.wav,clips/a.mp4,dog,train;all,park-1\n"
                   f"b,{tmp_path}/b.wav,,cat,test,park-2\n"
                   "c,c.wav,c.mp4,,,\n")
    m = read_csv_manifest(csv, allow_outside_root=True)  # b.wav is absolute
    assert m.name == "mine" and m.root == csv.parent.absolute()
    assert m.classes == ["cat", "dog"]
    a, b, c = m.clips
    assert a.audio == Path("a.wav") and a.video == Path("clips/a.mp4") and a.splits == {"train", "all"}
    assert b.audio == tmp_path / "b.wav" and b.video is None and b.location == "park-2"
    assert c.label is None and c.splits == frozenset()
    with pytest.raises(MissingFilesError) as err:
        check_files(m)
    assert len(err.value.paths) == 5 and csv.parent.absolute() / "clips/a.mp4" in err.value.paths


def test_csv_manifest_with_given_classes_checks_labels(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("clip_id\taudio\tlabel\nx\tx.wav\tbus\ny\ty.wav\tbeach\n")
    assert read_csv_manifest(csv, classes=["tram", "bus", "beach"]).classes == ["tram", "bus", "beach"]
    with pytest.raises(DatasetFormatError, match=r"m.csv, line 3: label 'beach' of clip 'y'"):
        read_csv_manifest(csv, classes=list(TAU_CLASSES))


@pytest.mark.parametrize("text, message", [
    ("id,audio\nx,x.wav\n", "need a clip_id column"),
    ("clip_id,audio,colour\nx,x.wav,red\n", "unknown column"),
    ("clip_id,audio\nx,x.wav\nx,y.wav\n", "line 3: clip 'x' already listed on line 2"),
])
def test_bad_csv_manifests(tmp_path, text, message):
    csv = tmp_path / "m.csv"
    csv.write_text(text)
    with pytest.raises(DatasetFormatError, match=message):
        read_csv_manifest(csv)


# ------------------------------------------------------------------------------ detection + checks


def test_open_dataset_recognises_each_kind(tmp_path, tiny_dataset, tiny_eval_dataset):
    assert open_dataset(tiny_dataset).audio_segments == 10
    assert len(open_dataset(tiny_dataset / "meta.csv")) == 20
    assert open_dataset(tiny_eval_dataset).audio_segments == 1
    (tmp_path / "csvdir").mkdir()
    (tmp_path / "csvdir" / "list.csv").write_text("clip_id,audio\nq,q.wav\n")
    assert open_dataset(tmp_path / "csvdir").clip_ids == ["q"]
    assert open_dataset(tmp_path / "csvdir" / "list.csv").name == "list"
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match="not a dataset this package reads"):
        open_dataset(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_dataset(tmp_path / "absent")


def test_check_files_lists_every_missing_file_at_once(tmp_path, tiny_dataset):
    root = tmp_path / "copy"
    shutil.copytree(tiny_dataset, root)
    m = read_tau(root)
    gone = [root / m.clips[0].audio, root / m.clips[5].audio, root / m.clips[7].video]
    for p in gone:
        p.unlink()
    with pytest.raises(MissingFilesError) as err:
        check_files(m)
    assert isinstance(err.value, FileNotFoundError)
    assert err.value.paths == gone and err.value.n_checked == 40
    text = str(err.value)
    assert text.startswith("3 of 40 files of dataset 'copy' are missing (2 under audio/, 1 under video/)")
    assert all(str(p) in text for p in gone)


def test_check_files_message_stays_readable_for_many_missing_files(tmp_path):
    clips = [ClipRecord(f"c{i}", Path(f"audio/c{i}.wav"), None) for i in range(150)]
    with pytest.raises(MissingFilesError) as err:
        check_files(Manifest("big", [], clips, tmp_path))
    assert len(err.value.paths) == 150
    assert "150 of 150 files" in str(err.value) and "and 50 more (all in .paths)" in str(err.value)


# ------------------------------------------------------------------------------ segments per clip


SHORT = dict(clips_per_class=1, n_cities=1, width=32, height=24, fps=5, progress=False)


def test_short_demo_clips_get_as_many_segments_as_seconds_and_extract(tmp_path):
    root = make_demo_dataset(tmp_path / "demo3", duration=3.0, **SHORT)
    m = read_tau(root)
    assert (m.audio_segments, m.segment_seconds, m.video_frames) == (3, 1.0, 12)
    assert load_audio_segments(root / m.clips[0].audio, 48000, m.audio_segments).shape == (3, 48000)
    summary = extract(root, tmp_path / "s.zarr", "logmel", **FAST)  # reads the directory itself
    assert (summary.clips_done, summary.clips_failed) == (10, 0)
    with open_store(tmp_path / "s.zarr") as store:
        assert store.get("logmel", m.clips[0].clip_id).shape[0] == 3
    assert (root / "dataset.json").is_file() and (root / "demo_config.json").is_file()
    (root / "dataset.json").unlink()  # without the sidecar: TAU's 10 s, whatever demo_config.json says
    assert read_tau(root).audio_segments == 10


def test_short_demo_eval_clips_get_as_many_segments_as_seconds(tmp_path):
    root = make_demo_eval_dataset(tmp_path / "eval2", n_clips=2, duration=2.0, width=32, height=24, fps=5,
                                  progress=False)
    m = read_tau_eval(root)
    assert (m.audio_segments, m.video_frames, len(m)) == (2, 5, 2)


def test_explicit_segment_and_frame_counts_override_every_reader(tmp_path, tiny_dataset, tiny_eval_dataset):
    assert (read_tau(tiny_dataset, audio_segments=4, video_frames=6).audio_segments,
            read_tau(tiny_dataset, audio_segments=4, video_frames=6).video_frames) == (4, 6)
    m = open_dataset(tiny_dataset, video_frames=3)
    assert (m.audio_segments, m.video_frames) == (10, 3)
    m = open_dataset(tiny_eval_dataset, audio_segments=2)
    assert (m.audio_segments, m.video_frames) == (2, 5)
    (tmp_path / "list.csv").write_text("clip_id,audio\nq,q.wav\n")
    m = open_dataset(tmp_path / "list.csv", audio_segments=7)
    assert (m.audio_segments, m.video_frames) == (7, 12)
    for bad in (0, 2.5, True, "3"):
        with pytest.raises(ValueError, match="audio_segments must be an integer >= 1"):
            open_dataset(tiny_dataset, audio_segments=bad)
    with pytest.raises(ValueError, match="video_frames must be an integer >= 1"):
        read_tau_eval(tiny_eval_dataset, video_frames=-1)
