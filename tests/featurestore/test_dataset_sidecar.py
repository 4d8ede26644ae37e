"""The dataset sidecar (``dataset.json``): every reader honours it, an argument wins over it, a bad
one is an error naming it, and readers ignore the demo generator's own ``demo_config.json``."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
from tests.featurestore.test_datasets import IDS, _fake_tau

from featurestore import demo
from featurestore.datasets import (
    DATASET_FILE,
    DatasetFormatError,
    DatasetSidecar,
    open_dataset,
    read_csv_manifest,
    read_tau,
    read_tau_eval,
)


def _eval_dir(root: Path, n: int = 3) -> Path:
    """An evaluation-layout directory (``audio/0.wav``..., empty files: readers only look at names)."""
    for sub, ext in (("audio", "wav"), ("video", "mp4")):
        (root / sub).mkdir(parents=True)
        for i in range(n):
            (root / sub / f"{i}.{ext}").write_bytes(b"")
    return root


def _csv_dir(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "list.csv").write_text("clip_id,audio\nq,q.wav\n")
    return root / "list.csv"


def _sidecar(directory: Path, text: str) -> Path:
    (directory / DATASET_FILE).write_text(text)
    return directory / DATASET_FILE


# ------------------------------------------------------------------------------ every reader honours it


@pytest.mark.parametrize("where", ["with meta.csv", "with the media"])
def test_read_tau_takes_segments_and_frames_from_the_sidecar(tmp_path, where):
    dev = tmp_path / "dev"
    meta = tmp_path / "dev.meta"
    _fake_tau(dev, IDS, {"fold1_train": IDS}, meta_dir=meta)
    _sidecar(meta if where == "with meta.csv" else dev, '{"clip_seconds": 3.0, "video_frames": 6}')
    m = read_tau(dev)
    assert (m.audio_segments, m.segment_seconds, m.video_frames) == (3, 1.0, 6)


def test_read_tau_eval_takes_the_segment_count_from_the_sidecar(tmp_path):
    root = _eval_dir(tmp_path / "eval")
    _sidecar(root, '{"audio_segments": 4}')
    m = read_tau_eval(root)
    assert (m.audio_segments, m.video_frames, len(m)) == (4, 5, 3)  # frames: the reader's default


def test_read_csv_manifest_takes_the_sidecar_next_to_the_csv(tmp_path):
    csv = _csv_dir(tmp_path / "mine")
    _sidecar(csv.parent, '{"clip_seconds": 2, "video_frames": 3}')
    m = read_csv_manifest(csv)
    assert (m.audio_segments, m.video_frames) == (2, 3)
    assert read_csv_manifest(csv, segment_seconds=0.5).audio_segments == 4  # clip_seconds / segment_seconds
    assert (open_dataset(csv.parent).audio_segments, open_dataset(csv).video_frames) == (2, 3)


def test_without_a_sidecar_each_reader_keeps_its_default(tmp_path):
    assert (read_tau(_fake_tau(tmp_path / "dev", IDS)).audio_segments,
            read_tau_eval(_eval_dir(tmp_path / "eval")).audio_segments,
            read_csv_manifest(_csv_dir(tmp_path / "csv")).audio_segments) == (10, 1, 10)


# ------------------------------------------------------------------------------ an argument wins


def test_an_explicit_argument_wins_over_the_sidecar(tmp_path):
    dev = _fake_tau(tmp_path / "dev", IDS)
    _sidecar(dev, '{"clip_seconds": 3, "video_frames": 6}')
    m = read_tau(dev, audio_segments=7)
    assert (m.audio_segments, m.video_frames) == (7, 6)  # the count not given still comes from the file
    assert open_dataset(dev, video_frames=2).video_frames == 2
    ev = _eval_dir(tmp_path / "eval")
    _sidecar(ev, '{"audio_segments": 4, "video_frames": 9}')
    assert (read_tau_eval(ev, video_frames=2).audio_segments, read_tau_eval(ev, video_frames=2).video_frames) == (4, 2)
    csv = _csv_dir(tmp_path / "csv")
    _sidecar(csv.parent, '{"clip_seconds": 2}')
    assert read_csv_manifest(csv, audio_segments=5).audio_segments == 5


def test_both_counts_given_do_not_read_the_sidecar_at_all(tmp_path):
    dev = _fake_tau(tmp_path / "dev", IDS)
    _sidecar(dev, "{not json")
    m = read_tau(dev, audio_segments=2, video_frames=3)
    assert (m.audio_segments, m.video_frames) == (2, 3)
    with pytest.raises(DatasetFormatError):
        read_tau(dev, audio_segments=2)


# ------------------------------------------------------------------------------ lengths and errors


@pytest.mark.parametrize("seconds, segments, warning", [
    (2.95, 3, None),          # container rounding: within 0.1 s of 3 segments
    (2.5, 2, "too long"),     # extraction would reject the clips: say so when reading
    (0.4, 1, "too short"),
])
def test_a_clip_length_that_is_not_whole_segments_is_rounded_down_with_a_warning(tmp_path, caplog, seconds,
                                                                                segments, warning):
    root = _fake_tau(tmp_path / "d", IDS)
    _sidecar(root, json.dumps({"clip_seconds": seconds}))
    with caplog.at_level("WARNING", logger="featurestore.datasets"):
        assert read_tau(root).audio_segments == segments
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if warning is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warning in warnings[0] and f"{seconds:g} s" in warnings[0]
        assert str(root.absolute() / DATASET_FILE) in warnings[0]


@pytest.mark.parametrize("text, message", [
    ("{not json", "not readable JSON"),
    ("[1, 2]", "expected a JSON object, found list"),
    ('{"clip_second": 3}', "unknown key(s) ['clip_second']; known: clip_seconds, audio_segments, video_frames"),
    ('{"clip_seconds": "ten"}', "expected a positive number of seconds under 'clip_seconds', found 'ten'"),
    ('{"clip_seconds": 0}', "found 0"),
    ('{"clip_seconds": Infinity}', "found inf"),
    ('{"audio_segments": true}', "expected an integer >= 1 under 'audio_segments', found True"),
    ('{"video_frames": 2.5}', "under 'video_frames', found 2.5"),
    ('{"clip_seconds": 3, "audio_segments": 3}', "give clip_seconds or audio_segments, not both"),
])
def test_a_malformed_sidecar_is_a_one_line_error_naming_the_file(tmp_path, text, message):
    root = _fake_tau(tmp_path / "d", IDS)
    path = _sidecar(root, text)
    with pytest.raises(DatasetFormatError) as err:
        read_tau(root)
    assert err.value.path == root.absolute() / DATASET_FILE and err.value.line is None
    assert message in str(err.value) and str(err.value).startswith(f"{path.absolute()}: ")
    assert "\n" not in str(err.value)


def test_every_reader_refuses_a_malformed_sidecar(tmp_path):
    ev = _eval_dir(tmp_path / "eval")
    csv = _csv_dir(tmp_path / "csv")
    for directory in (ev, csv.parent):
        _sidecar(directory, '{"video_frames": 0}')
    with pytest.raises(DatasetFormatError, match="video_frames"):
        read_tau_eval(ev)
    with pytest.raises(DatasetFormatError, match="video_frames") as err:
        read_csv_manifest(csv)
    assert err.value.path == csv.parent.absolute() / DATASET_FILE


def test_sidecar_round_trips_and_writes_only_the_fields_set(tmp_path):
    path = DatasetSidecar(clip_seconds=2.5, video_frames=3).write(tmp_path)
    assert path == tmp_path / DATASET_FILE
    assert json.loads(path.read_text()) == {"clip_seconds": 2.5, "video_frames": 3}
    assert DatasetSidecar.read(path) == DatasetSidecar(clip_seconds=2.5, video_frames=3)


# ------------------------------------------------------------------------------ the demo generator


def test_the_generator_writes_the_sidecar_with_its_clip_length(tiny_dataset, tiny_eval_dataset):
    assert json.loads((tiny_dataset / DATASET_FILE).read_text()) == {"clip_seconds": 10.0}
    assert json.loads((tiny_eval_dataset / DATASET_FILE).read_text()) == {"clip_seconds": 1.0}


def test_readers_ignore_demo_config_and_add_dataset_file_upgrades_an_old_demo_dir(tmp_path):
    dev = _fake_tau(tmp_path / "dev", IDS)
    config = dev / demo.CONFIG_FILE
    config.write_text('{"duration": 3.0, "layout": "development"}')  # what the old generator left
    assert read_tau(dev).audio_segments == 10  # TAU's default: readers read only dataset.json
    ev = _eval_dir(tmp_path / "eval")
    (ev / demo.CONFIG_FILE).write_text('{"duration": 2.0, "layout": "evaluation"}')
    assert read_tau_eval(ev).audio_segments == 1
    assert demo.add_dataset_file(dev) == dev / DATASET_FILE
    assert read_tau(dev).audio_segments == 3
    _sidecar(dev, '{"clip_seconds": 5}')
    demo.add_dataset_file(dev)  # an existing sidecar is kept
    assert read_tau(dev).audio_segments == 5
    with pytest.raises(ValueError, match="not a demo config"):
        demo.add_dataset_file(_fake_tau(tmp_path / "plain", IDS))


def test_the_old_generator_module_is_gone():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("featurestore.datasets.synthetic")
