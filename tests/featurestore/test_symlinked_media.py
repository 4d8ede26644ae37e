"""Symlinks placed inside a dataset folder are followed; listed paths that escape it as written are not.

The layout of shared machines: a dataset folder of one's own holding the metadata, its ``audio`` and
``video`` symlinked to the one copy of the media (``audio -> /data/tau/audio``), or single files
linked in. Where such a link points is the dataset owner's choice. What a manifest *lists* stays
under the root as written: an absolute path or a ``..`` component (even one that seems to come back,
``audio/../x.wav``, which after a symlinked ``audio`` leads next to the link's target) is refused
unless ``allow_outside_root`` says it is meant. Every test uses real symlinks and real files.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from tests.featurestore.test_extract_support import assert_same_arrays, clip_id, make_dataset, read_all, write_wav

from featurestore.cli import main
from featurestore.datasets import (
    DatasetFormatError, check_files, open_dataset, read_csv_manifest, read_tau, read_tau_eval,
)
from featurestore.store import open_store

N_CLIPS = 2


@pytest.fixture
def shared(tmp_path) -> Path:
    """The one copy of the media, as on a shared machine (``/data/tau``): audio/, video/, meta.csv."""
    root = tmp_path / "data" / "tau"
    make_dataset(root, N_CLIPS, seconds=1.0, rate=8000)
    return root


def _linked_dataset(folder: Path, shared: Path) -> Path:
    """A dataset folder of one's own: meta.csv and a split file copied, audio/ and video/ symlinked."""
    folder.mkdir(parents=True)
    shutil.copy(shared / "meta.csv", folder / "meta.csv")
    (folder / "evaluation_setup").mkdir()
    (folder / "evaluation_setup" / "fold1_train.csv").write_text(
        "filename_audio\tfilename_video\tscene_label\n"
        + "".join(f"audio/{clip_id(i)}.wav\tvideo/{clip_id(i)}.mp4\t{clip_id(i).split('-')[0]}\n"
                  for i in range(N_CLIPS)))
    (folder / "audio").symlink_to(shared / "audio", target_is_directory=True)
    (folder / "video").symlink_to(shared / "video", target_is_directory=True)
    return folder


def test_read_tau_follows_symlinked_audio_and_video_directories(tmp_path, shared) -> None:
    mine = _linked_dataset(tmp_path / "home" / "my-tau", shared)
    manifest = read_tau(mine)
    assert manifest.root == mine  # the folder as given, not where its links lead
    assert [c.audio.as_posix() for c in manifest.clips] == [f"audio/{clip_id(i)}.wav" for i in range(N_CLIPS)]
    assert all(c.splits == {"fold1_train"} for c in manifest.clips)
    check_files(manifest)  # every file is there, through the links
    assert open_dataset(mine).clip_ids == manifest.clip_ids


def test_read_tau_eval_follows_symlinked_directories_and_files(tmp_path, shared) -> None:
    """Both ways of listing an evaluation set: split files, and the audio/ and video/ listing."""
    mine = _linked_dataset(tmp_path / "eval-folds", shared)
    (mine / "meta.csv").unlink()
    assert [c.clip_id for c in read_tau_eval(mine).clips] == [clip_id(i) for i in range(N_CLIPS)]
    listing = tmp_path / "eval-listing"
    (listing / "audio").mkdir(parents=True)
    write_wav(listing / "audio" / "0.wav", 1.0, seed=0, rate=8000)
    (listing / "audio" / "1.wav").symlink_to(shared / "audio" / f"{clip_id(1)}.wav")  # one file linked in
    (listing / "video").symlink_to(shared / "video", target_is_directory=True)  # a directory linked in
    manifest = read_tau_eval(listing)
    assert [c.clip_id for c in manifest.clips] == ["0", "1", *(clip_id(i) for i in range(N_CLIPS))]
    assert [c.audio.as_posix() for c in manifest.clips[:2]] == ["audio/0.wav", "audio/1.wav"]


def test_read_csv_manifest_follows_a_symlinked_directory_and_a_symlinked_file(tmp_path, shared) -> None:
    data = tmp_path / "home" / "csv"
    data.mkdir(parents=True)
    (data / "audio").symlink_to(shared / "audio", target_is_directory=True)
    (data / "one.wav").symlink_to(shared / "audio" / f"{clip_id(1)}.wav")
    path = data / "clips.csv"
    path.write_text(f"clip_id,audio,label\na,audio/{clip_id(0)}.wav,x\nb,one.wav,y\n")
    manifest = read_csv_manifest(path)
    assert [c.audio.as_posix() for c in manifest.clips] == [f"audio/{clip_id(0)}.wav", "one.wav"]
    check_files(manifest)


@pytest.mark.parametrize("template, why", [
    ("audio/../{}.wav", "has a '..' component"),  # "comes back" as written, not through the link
    ("../{}.wav", "has a '..' component"),
    ("{shared}/{}.wav", "is absolute"),
], ids=["dotdot-back-in", "dotdot", "absolute"])
def test_listed_paths_that_escape_the_root_as_written_are_still_refused(tmp_path, shared, template, why) -> None:
    mine = _linked_dataset(tmp_path / "home" / "my-tau", shared)
    first = f"audio/{clip_id(0)}.wav"
    shutil.copy(shared / first, shared / f"{clip_id(0)}.wav")  # where audio/../ really leads: a real file
    listed = template.format(clip_id(0), shared=shared)
    csv = mine / "clips.csv"
    csv.write_text(f"clip_id,audio,label\nbad,{listed},x\n")
    with pytest.raises(DatasetFormatError) as info:
        read_csv_manifest(csv)
    message = str(info.value)
    assert message.startswith(f"{csv}, line 2: clip 'bad': path {listed!r} {why}") and "\n" not in message
    assert "allow_outside_root=True" in message
    assert read_csv_manifest(csv, allow_outside_root=True).clips[0].audio == Path(listed)
    meta = mine / "meta.csv"
    meta.write_text(meta.read_text().replace(first, listed, 1))
    with pytest.raises(DatasetFormatError, match=rf"^{meta}, line 2: clip {clip_id(0)!r}: path .* {why}"):
        read_tau(mine)


def test_featurestore_extract_through_symlinked_media_succeeds_with_the_same_features(tmp_path, shared,
                                                                                       capsys) -> None:
    """A real extraction: exit 0, the store records the listed paths, the features are those of the
    same files extracted from where they really are."""
    mine = _linked_dataset(tmp_path / "home" / "my-tau", shared)
    options = ["--encoders", "logmel", "--device", "cpu", "--num-workers", "0", "--segments", "1", "--quiet"]
    linked, direct = tmp_path / "linked.zarr", tmp_path / "direct.zarr"
    assert main(["extract", str(mine), str(linked), *options]) == 0, capsys.readouterr().err
    assert main(["extract", str(shared), str(direct), *options]) == 0, capsys.readouterr().err
    assert f"{N_CLIPS} clips done" in capsys.readouterr().out
    with open_store(linked) as store:
        assert list(store.column("audio_path")) == [f"audio/{clip_id(i)}.wav" for i in range(N_CLIPS)]
        assert store.errors("logmel") == {}
    assert_same_arrays(read_all(linked), read_all(direct))


def test_a_symlinked_dataset_root_itself_is_read(tmp_path, shared) -> None:
    """``~/tau -> /data/tau``: the folder given may itself be a link."""
    link = tmp_path / "tau-link"
    link.symlink_to(shared, target_is_directory=True)
    manifest = read_tau(link)
    assert manifest.root == link and len(manifest.clips) == N_CLIPS
    check_files(manifest)
    assert os.path.islink(link)
