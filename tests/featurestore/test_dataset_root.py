"""The dataset root is a boundary: listed paths that are absolute or hold ``..`` are refused by default;
symlinks placed under the root are followed (more in test_symlinked_media.py)."""
from __future__ import annotations

import os
import shutil

import pytest
from tests.featurestore.test_extract_support import clip_id, make_dataset, write_wav

from featurestore.cli import main
from featurestore.datasets import DatasetFormatError, open_dataset, read_csv_manifest, read_tau, read_tau_eval


def _csv(root, rows: list[str]):
    root.mkdir(parents=True, exist_ok=True)
    path = root / "clips.csv"
    path.write_text("clip_id,audio,label\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture
def outside(tmp_path):
    """A WAV file outside the dataset directory ``tmp_path / 'data'``."""
    (tmp_path / "outside").mkdir()
    return write_wav(tmp_path / "outside" / "x.wav", 1.0, seed=0, rate=8000)


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_csv_paths_outside_the_root_are_refused_unless_allowed(kind, tmp_path, outside) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_wav(data / "ok.wav", 1.0, seed=1, rate=8000)
    listed = {"dotdot": "../outside/x.wav", "absolute": str(outside)}[kind]
    path = _csv(data, ["good,ok.wav,a", f"bad,{listed},b"])
    with pytest.raises(DatasetFormatError) as info:
        read_csv_manifest(path)
    message = str(info.value)
    assert "\n" not in message and f"{path}, line 3" in message and "'bad'" in message and repr(listed) in message
    assert ("is absolute" if kind == "absolute" else "has a '..' component") in message
    assert "allow_outside_root=True" in message
    with pytest.raises(DatasetFormatError):
        open_dataset(path)
    manifest = read_csv_manifest(path, allow_outside_root=True)
    assert [c.clip_id for c in manifest.clips] == ["good", "bad"]
    assert open_dataset(path, allow_outside_root=True).clips[1].audio.name == listed.rsplit("/", 1)[-1]


def test_tau_meta_path_outside_the_root_is_refused(tmp_path) -> None:
    root = tmp_path / "tau"
    make_dataset(root, 2, seconds=1.0)
    meta = root / "meta.csv"
    name = clip_id(1)
    meta.write_text(meta.read_text().replace(f"audio/{name}.wav", f"../elsewhere/{name}.wav"))
    with pytest.raises(DatasetFormatError) as info:
        read_tau(root)
    message = str(info.value)
    assert f"{meta}, line 3" in message and repr(name) in message and f"'../elsewhere/{name}.wav'" in message
    assert read_tau(root, allow_outside_root=True).clips[1].audio.as_posix() == f"../elsewhere/{name}.wav"


def test_tau_eval_symlink_placed_inside_is_followed(tmp_path, outside) -> None:
    """Where a link under the root points is the dataset owner's choice (shared machines link media in);
    the listed path, ``audio/1.wav``, is under the root as written."""
    root = tmp_path / "eval"
    (root / "audio").mkdir(parents=True)
    write_wav(root / "audio" / "0.wav", 1.0, seed=0, rate=8000)
    os.symlink(outside, root / "audio" / "1.wav")
    manifest = read_tau_eval(root)
    assert [(c.clip_id, c.audio.as_posix()) for c in manifest.clips] == [("0", "audio/0.wav"), ("1", "audio/1.wav")]


def test_extract_cli_refuses_before_any_work_and_accepts_with_the_flag(tmp_path, outside, capsys) -> None:
    data = tmp_path / "data"
    path = _csv(data, [f"far,{outside},a"])
    store = tmp_path / "s.zarr"
    args = ["extract", str(path), str(store), "--encoders", "logmel", "--device", "cpu", "--num-workers", "0",
            "--segments", "1", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "'far'" in err and "--allow-outside-root" in err
    assert not store.exists()
    assert main([*args, "--allow-outside-root"]) == 0
    assert "1 clips done" in capsys.readouterr().out
    shutil.rmtree(store)
