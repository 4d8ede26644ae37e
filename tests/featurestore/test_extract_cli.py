"""``featurestore extract`` on a TAU-layout directory: exit codes 0 / 1 / 2 and what it prints."""
from __future__ import annotations

import json
import shutil

import pytest
from tests.featurestore.test_extract_support import clip_id, make_dataset

from featurestore.cli import main
from featurestore.extract import DEFAULT_ENCODERS
from featurestore.store import open_store

LIGHT = ["--encoders", "logmel,timm/test_vit@none", "--device", "cpu", "--frames", "2", "--num-workers", "0",
         "--chunk-clips", "2", "--batch-size", "2", "--quiet"]


@pytest.fixture(scope="module")
def tau_dir(tmp_path_factory):
    """Three 10 s clips in the TAU development layout (8 kHz audio, 1 fps video: small files)."""
    root = tmp_path_factory.mktemp("tau") / "TAU-urban-audio-visual-scenes-2021-development"
    make_dataset(root, 3, seconds=10.0, rate=8000, fps=1)
    return root


def test_extract_exits_0_prints_the_summary_and_writes_json(tau_dir, tmp_path, capsys):
    store, report = tmp_path / "s.zarr", tmp_path / "summary.json"
    assert main(["extract", str(tau_dir), str(store), *LIGHT, "--summary-json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "extract: 3 clips done, 0 skipped, 0 failed of 3" in out and "RANDOM weights: timm/test_vit" in out
    data = json.loads(report.read_text())
    assert data["clips_done"] == 3 and data["features"]["logmel"]["written"] == 3
    with open_store(store) as fs:
        assert fs.feature_sets()["logmel"].shape == (3, 10, 256, 94)
        assert fs.feature_sets()["timm/test_vit"].shape == (3, 2, 64)
    assert main(["extract", str(tau_dir), str(store), *LIGHT]) == 0  # rerun: nothing to do
    assert "0 clips done, 3 skipped" in capsys.readouterr().out


def test_a_clip_that_fails_gives_exit_1_and_is_listed(tau_dir, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(tau_dir, root)
    (root / "audio" / f"{clip_id(1)}.wav").write_bytes(b"\x00garbage" * 64)
    assert main(["extract", str(root), str(tmp_path / "s.zarr"), *LIGHT]) == 1
    out = capsys.readouterr().out
    assert "2 clips done, 0 skipped, 1 failed of 3" in out and f"FAILED {clip_id(1)}: logmel: decode failed" in out


def test_missing_files_give_exit_2_with_every_path_before_any_work(tau_dir, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(tau_dir, root)
    (root / "audio" / f"{clip_id(0)}.wav").unlink()
    (root / "video" / f"{clip_id(2)}.mp4").unlink()
    assert main(["extract", str(root), str(tmp_path / "s.zarr"), *LIGHT]) == 2
    err = capsys.readouterr().err
    assert f"{clip_id(0)}.wav" in err and f"{clip_id(2)}.mp4" in err and "2 of 6 files" in err
    assert not (tmp_path / "s.zarr").exists()


def test_another_encoder_config_gives_exit_2_unless_overwrite(tau_dir, tmp_path, capsys):
    store = tmp_path / "s.zarr"
    assert main(["extract", str(tau_dir), str(store), *LIGHT]) == 0
    other = [a if a != "2" else "3" for a in LIGHT]  # --frames 3 (and chunk/batch 3: same rows)
    capsys.readouterr()
    assert main(["extract", str(tau_dir), str(store), *other]) == 2
    err = capsys.readouterr().err
    assert "already exists with a different configuration" in err and "--overwrite" in err
    assert main(["extract", str(tau_dir), str(store), *other, "--overwrite"]) == 0
    with open_store(store) as fs:
        assert fs.feature_sets()["timm/test_vit"].shape == (3, 3, 64)


def test_unknown_encoder_gives_exit_2_naming_it(tau_dir, tmp_path, capsys):
    assert main(["extract", str(tau_dir), str(tmp_path / "s.zarr"), *LIGHT[:0], "--encoders", "nosuch/x"]) == 2
    assert "nosuch" in capsys.readouterr().err


def test_default_encoders_are_the_papers_and_fail_offline_with_the_way_out(tau_dir, tmp_path, capsys):
    assert DEFAULT_ENCODERS == "logmel,timm/regnetx_064,clip/RN50x4,clip/RN101,clip/ViT-B-32"
    code = main(["extract", str(tau_dir), str(tmp_path / "s.zarr"), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    if code == 0:
        pytest.skip("pretrained weights are available on this machine")
    assert code == 2 and "@none" in err and "regnetx_064" in err


def test_help_lists_every_option(capsys):
    assert main(["extract", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--encoders", "--device", "--batch-size", "--num-workers", "--frames", "--limit", "--overwrite",
                   "--scheduler", "--backend", "--chunk-clips"):
        assert option in out


def test_segments_override_fits_clips_of_another_length(tmp_path, capsys):
    root = tmp_path / "short"
    make_dataset(root, 2, seconds=3.0, frames=1)  # a TAU layout whose clips are 3 s, not 10
    store = tmp_path / "s.zarr"
    assert main(["extract", str(root), str(store), "--encoders", "logmel", "--num-workers", "0", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "too short: 3 s, expected 10 s (10 segments of 1 s)" in out and "hint:" in out and "--segments N" in out
    assert main(["extract", str(root), str(tmp_path / "t.zarr"), "--encoders", "logmel", "--segments", "3",
                 "--num-workers", "0", "--quiet"]) == 0
    with open_store(tmp_path / "t.zarr") as s:
        assert s.feature_sets()["logmel"].shape == (2, 3, 256, 94)
    assert main(["extract", str(root), str(store), "--segments", "0", "--encoders", "logmel"]) == 2
