"""CLI errors a newcomer meets on the README tour: each is one line naming the thing and what to do."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from featurestore import TAU_CLASSES, ClipRecord, Manifest, create_store
from featurestore.cli import main

FEAT = "clip/ViT-B-32"


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A 4-clip Zarr store with one finished 2x3 feature set."""
    clips = [ClipRecord(f"bus-prague-{i}-{i}", label="bus", city="prague", location=f"prague-{i}",
                        video=Path(f"video/bus-prague-{i}-{i}.mp4"), splits=frozenset({"fold1_train"}))
             for i in range(4)]
    prov = {"encoder": "clip/ViT-B-32@none", "config": {}, "weights": {"kind": "random", "seed": 7},
            "segments": {"frames": 2}}
    path = tmp_path / "s.zarr"
    with create_store(str(path), Manifest("toy", list(TAU_CLASSES), clips)) as handle:
        handle.create_feature_set(FEAT, 2, (3,), prov, chunk_clips=4)
        handle.write_rows(FEAT, 0, np.ones((4, 2, 3), np.float16))
    return path


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_get_into_a_missing_folder_names_the_folder(store: Path, tmp_path: Path, capsys) -> None:
    """Was `featurestore get: error: [Errno 2] No such file or directory: '.../nodir/x.npy'`."""
    out = tmp_path / "nodir" / "x.npy"
    assert main(["get", str(store), "bus-prague-0-0", FEAT, "-o", str(out)]) == 2
    err = _error_line(capsys)
    assert f"folder {out.parent} does not exist" in err and "Errno" not in err
    assert not out.parent.exists()


def test_get_that_fails_mid_write_keeps_the_previous_npy(store: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """A full disk half way through `numpy.save` leaves the old file whole and says so (exit 1); it
    once truncated the old file to the half-written one and called it bad usage (exit 2)."""
    out = tmp_path / "x.npy"
    np.save(out, np.zeros(5))
    before = out.read_bytes()

    def half_then_full(target, array) -> None:
        handle = open(target, "wb") if isinstance(target, (str, Path)) else target
        handle.write(b"\x93NUMPY half")
        handle.flush()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("featurestore.cli.np.save", half_then_full)
    assert main(["get", str(store), "bus-prague-0-0", FEAT, "-o", str(out)]) == 1
    assert "disk full" in _error_line(capsys)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr", "x.npy"]


@pytest.mark.parametrize("target", ["source", "dataset"])
def test_convert_onto_what_overwrite_would_refuse_does_not_advise_overwrite(
        store: Path, tmp_path: Path, target: str, capsys) -> None:
    """Was `DST exists; pass --overwrite to replace it`, and with --overwrite: refused anyway."""
    dst = store if target == "source" else tmp_path / "data"
    if target == "dataset":
        dst.mkdir()
        (dst / "meta.csv").write_text("filename_audio\n")
    assert main(["convert", str(store), str(dst)]) == 2
    err = _error_line(capsys)
    assert "--overwrite" not in err
    assert ("would delete the source" in err) if target == "source" else ("is not a feature store" in err)
    if target == "dataset":
        assert sorted(p.name for p in dst.iterdir()) == ["meta.csv"]


def test_convert_onto_an_old_store_still_advises_overwrite(store: Path, tmp_path: Path, capsys) -> None:
    """A store at DST is what --overwrite replaces: the advice stays."""
    dst = tmp_path / "copy.zarr"
    assert main(["convert", "-q", str(store), str(dst)]) == 0
    capsys.readouterr()
    assert main(["convert", str(store), str(dst)]) == 2
    assert "pass --overwrite to replace it" in _error_line(capsys)


def test_fusion_help_spells_options_as_docs_fusion_md_does(capsys) -> None:
    """docs/fusion.md writes `[--calibration-split SPLIT] [--cross-fit K]`; --help said CALIBRATION_SPLIT, CROSS_FIT."""
    from fusion.cli import main as fusion_main

    with pytest.raises(SystemExit):
        fusion_main(["evaluate", "--help"])
    usage = " ".join(capsys.readouterr().out.split())
    assert "[--calibration-split SPLIT]" in usage and "[--cross-fit K]" in usage
    synopsis = (Path(__file__).parents[1] / "docs" / "fusion.md").read_text()
    assert "[--calibration-split SPLIT] [--cross-fit K]" in synopsis


def test_heads_train_with_a_recipe_file_that_is_not_there_says_so_in_one_line(tmp_path, capsys):
    """Before: ``heads train: error: [Errno 2] No such file or directory: '.../typo.jsn'``."""
    from heads.cli import main as heads_main

    missing = tmp_path / "typo.jsn"
    assert heads_main(["train", "--recipe", str(missing), "--store", str(tmp_path / "s.zarr")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"heads train: error: recipe file {str(missing)!r} does not exist", err


def test_heads_predict_with_a_run_directory_that_is_not_there_says_so(tmp_path, capsys):
    """Before: '... is not a training run directory (no run.json)' for a path that does not exist at all."""
    from heads.cli import main as heads_main
    from tests.heads._store import build_store

    store = build_store(tmp_path / "s.zarr", n_clips=8)
    missing = tmp_path / "runs" / "nope"
    code = heads_main(["predict", "--store", str(store), "--run", str(missing), "--name", "p"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"run directory {str(missing)!r} does not exist" in err and "\n" not in err, err
