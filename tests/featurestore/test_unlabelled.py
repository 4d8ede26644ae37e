"""Manifests without labels (``clip_id,audio,video``): the class list comes from ``--classes`` /
``classes=``, and labelled clips whose label is not among the given classes are refused in one line."""
from __future__ import annotations

import pytest
from tests.featurestore.test_extract_support import FAST, clip_id, make_dataset

from featurestore.cli import main
from featurestore.datasets import open_dataset, read_tau, read_tau_eval
from featurestore.extract import classes_argument, extract
from featurestore.manifest import TAU_CLASSES
from featurestore.store import open_store

QUIET = ["--encoders", "logmel", "--device", "cpu", "--num-workers", "0", "--chunk-clips", "2", "--batch-size", "2",
         "-q"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three 2 s clips (WAV + MP4) and two CSV manifests over them: without and with labels."""
    root = tmp_path_factory.mktemp("unlabelled") / "data"
    manifest = make_dataset(root, 3, seconds=2.0, frames=1)
    rows = [(c.clip_id, c.audio.as_posix(), c.video.as_posix()) for c in manifest.clips]
    (root / "plain.csv").write_text("clip_id,audio,video\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    (root / "labelled.csv").write_text("clip_id,audio,video,label\n" + "".join(
        f"{a},{b},{c},{lab}\n" for (a, b, c), lab in zip(rows, ["quiet", "loud", "odd"])))
    return root


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_extract_classes_gives_an_unlabelled_manifest_its_class_list(data, tmp_path, capsys):
    store = tmp_path / "s.zarr"
    code, out, err = run(capsys, "extract", str(data / "plain.csv"), str(store), *QUIET, "--segments", "2",
                         "--classes", "quiet, loud")
    assert code == 0, err
    with open_store(store) as fs:
        assert fs.classes == ["quiet", "loud"] and (fs.labels == -1).all() and fs.n_clips == 3
    listing = tmp_path / "classes.txt"
    listing.write_text("# one class per line\nquiet\n\nloud\nodd\n")
    assert extract(data / "plain.csv", tmp_path / "t.zarr", "logmel", classes=classes_argument(f"@{listing}"),
                   segments=2, **FAST).exit_code == 0
    with open_store(tmp_path / "t.zarr") as fs:
        assert fs.classes == ["quiet", "loud", "odd"]


def test_without_classes_the_store_has_none_and_a_later_classes_run_sets_them(data, tmp_path, capsys):
    store = tmp_path / "s.zarr"
    assert run(capsys, "extract", str(data / "plain.csv"), str(store), *QUIET, "--segments", "2")[0] == 0
    with open_store(store) as fs:
        assert fs.classes == []
    code, _, err = run(capsys, "extract", str(data / "plain.csv"), str(store), *QUIET, "--segments", "2",
                       "--classes", "quiet,loud")
    assert code == 0 and "classes set to quiet, loud" in err
    with open_store(store) as fs:
        assert fs.classes == ["quiet", "loud"] and fs.feature_info("logmel").n_done == 3


def test_labels_outside_the_given_classes_are_one_line_errors(data, tmp_path, capsys):
    code, _, err = run(capsys, "extract", str(data / "labelled.csv"), str(tmp_path / "s.zarr"), *QUIET,
                       "--classes", "quiet,loud")
    assert code == 2 and "line 4: label 'odd'" in err and clip_id(2) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.zarr").exists()
    for bad, message in (("a,a", "more than once"), ("@" + str(tmp_path / "none.txt"), "cannot read")):
        code, _, err = run(capsys, "extract", str(data / "plain.csv"), str(tmp_path / "s.zarr"), *QUIET,
                           "--classes", bad)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_every_reader_takes_the_class_list(data, tmp_path):
    labelled = open_dataset(data / "labelled.csv", classes=["odd", "loud", "quiet"])
    assert labelled.classes == ["odd", "loud", "quiet"]
    assert open_dataset(data / "plain.csv", classes=["x"]).classes == ["x"]
    assert read_tau(data, classes=list(TAU_CLASSES)[::-1]).classes == list(TAU_CLASSES)[::-1]
    with pytest.raises(ValueError, match=f"clip '{clip_id(1)}' has label 'bus'"):
        read_tau(data, classes=["airport"])  # make_dataset labels its clips airport, bus, metro
    evaluation = tmp_path / "eval"
    (evaluation / "audio").mkdir(parents=True)
    (evaluation / "audio" / "0.wav").write_bytes((data / "audio" / f"{clip_id(0)}.wav").read_bytes())
    assert read_tau_eval(evaluation).classes == list(TAU_CLASSES)
    assert read_tau_eval(evaluation, classes=["day", "night"]).classes == ["day", "night"]
