"""Hostile extraction runs: every clip marked done holds its own media's features, whatever the runs.

Attacks on resume and on the pipeline's row bookkeeping: broken clips in the middle of encode
batches that do not divide the chunks, clips of several rates / frame sizes / frame rates in one
batch (on both preprocessing paths), a rerun over a reordered and grown manifest, a clip without
video, a store write that fails mid-run, and reruns asking for another configuration under the
same feature-set name. Each done row is compared with the encoder run directly on that clip's
own file, and must be nearer to it than to any other clip's features.
"""
from __future__ import annotations

import contextlib
import errno
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from tests.featurestore.test_extract_support import (
    ENCODERS, assert_same_arrays, clip_id, make_dataset, read_all, write_mp4, write_wav,
)

import featurestore.extract.workers as extract_workers
from featurestore import Manifest
from featurestore.decode import DecodeError, load_audio_segments, sample_frames
from featurestore.encoders import create_encoder
from featurestore.errors import FingerprintMismatchError
from featurestore.extract import StoreWriteError, extract
from featurestore.store import FeatureStore, open_store

#: In-process decoding (no fork) keeps each run about a second on two cores.
QUICK = dict(device="cpu", batch_size=3, num_workers=0, chunk_clips=4, progress=False)


@pytest.fixture(scope="module")
def encoders():
    """The two light encoders, built once, to encode clips directly."""
    return {"logmel": create_encoder("logmel"), "timm/test_vit": create_encoder("timm/test_vit@none")}


def own_features(encoders: dict, manifest: Manifest, cid: str) -> dict[str, np.ndarray]:
    """Each encoder run directly on the clip's own files (float32); files that do not decode are left out."""
    clip = next(c for c in manifest.clips if c.clip_id == cid)
    out = {}
    with contextlib.suppress(DecodeError):
        if clip.audio is not None:
            audio = load_audio_segments(manifest.root / clip.audio, 48000, manifest.audio_segments, 1.0)
            enc = encoders["logmel"]
            out["logmel"] = enc.encode(enc.preprocessor()(audio)).numpy()
    with contextlib.suppress(DecodeError):
        if clip.video is not None:
            frames = sample_frames(manifest.root / clip.video, manifest.video_frames)
            enc = encoders["timm/test_vit"]
            out["timm/test_vit"] = enc.encode(enc.preprocessor()(frames)).numpy()
    return out


def assert_done_rows_are_their_own(path: Path, manifest: Manifest, encoders: dict) -> dict[str, set[str]]:
    """Every done row of every set equals its clip's direct encoding (float16 tolerance) and is
    nearer to it than to any other clip's; returns the done clip ids per set."""
    expected = {cid: own_features(encoders, manifest, cid) for cid in manifest.clip_ids}
    done: dict[str, set[str]] = {}
    with open_store(path) as store:
        assert store.verify().ok
        for name in store.feature_sets():
            mask = store.done_mask(name)
            done[name] = {store.clip_ids[r] for r in np.flatnonzero(mask)}
            for cid in done[name]:
                got = store.get(name, cid).astype(np.float32)
                assert name in expected[cid], f"{name} {cid}: done, but its file does not decode"
                mine = expected[cid][name]
                np.testing.assert_allclose(got, mine, rtol=1e-2, atol=0.05, err_msg=f"{name} {cid}")
                mine_err = float(np.abs(got - mine).mean())
                for other, feats in expected.items():
                    if other != cid and name in feats:
                        assert float(np.abs(got - feats[name]).mean()) > mine_err, (name, cid, other)
    return done


def copy_dataset(manifest: Manifest, root: Path) -> Manifest:
    shutil.copytree(manifest.root, root)
    return replace(manifest, root=root)


@pytest.fixture(scope="module")
def seven(tmp_path_factory):
    """Seven 2 s clips (2 segments, 2 frames each)."""
    return make_dataset(tmp_path_factory.mktemp("seven"), 7)


def test_broken_clips_inside_uneven_batches_leave_every_other_row_its_own_features(seven, encoders, tmp_path):
    data = copy_dataset(seven, tmp_path / "data")
    (data.root / data.clips[1].video).write_bytes(b"\x00not an mp4" * 64)  # video broken, audio fine
    wav4 = data.root / data.clips[4].audio
    wav4.write_bytes(wav4.read_bytes()[:200])  # truncated audio, video fine
    write_wav(data.root / data.clips[5].audio, 3.5, seed=5)  # too long for 2 segments
    path = tmp_path / "s.zarr"
    summary = extract(data, path, ENCODERS, **{**QUICK, "num_workers": 1})  # batches of 3 in chunks of 4
    assert summary.exit_code == 1
    assert set(summary.failures) == {clip_id(1), clip_id(4), clip_id(5)}
    done = assert_done_rows_are_their_own(path, data, encoders)
    ids = set(data.clip_ids)
    assert done["logmel"] == ids - {clip_id(4), clip_id(5)}
    assert done["timm/test_vit"] == ids - {clip_id(1)}
    with open_store(path) as store:
        assert set(store.errors("logmel")) == {clip_id(4), clip_id(5)}
        assert set(store.errors("timm/test_vit")) == {clip_id(1)}
    before = read_all(path)

    write_wav(wav4, 2.0, seed=4)  # repaired as the original; clip 5 repaired with another signal
    write_wav(data.root / data.clips[5].audio, 2.0, seed=55)
    write_mp4(data.root / data.clips[1].video, 2.0, seed=1)
    again = extract(data, path, ENCODERS, **QUICK)
    assert again.exit_code == 0 and again.clips_done == 3 and again.clips_skipped == 4
    done = assert_done_rows_are_their_own(path, data, encoders)  # clip 5 is its new file's
    assert done["logmel"] == done["timm/test_vit"] == ids
    after = read_all(path)
    with open_store(path) as store:
        assert not store.errors("logmel") and not store.errors("timm/test_vit")
    for name, (values, mask) in before.items():  # rows done before keep their bits
        np.testing.assert_array_equal(after[name][0][mask].view(np.uint16), values[mask].view(np.uint16))


def test_a_rerun_over_a_reordered_grown_manifest_equals_a_one_shot_extraction(seven, encoders, tmp_path):
    first = replace(seven, clips=[seven.clips[i] for i in (5, 2, 0)])
    path = tmp_path / "grown.zarr"
    assert extract(first, path, ENCODERS, **QUICK).clips_done == 3
    shuffled = replace(seven, clips=[seven.clips[i] for i in (6, 3, 0, 5, 1, 4, 2)])
    second = extract(shuffled, path, ENCODERS, **{**QUICK, "batch_size": 2, "limit": 5})
    assert (second.clips_done, second.clips_skipped) == (3, 2)  # 6, 3, 1 new; 0, 5 done before
    with open_store(path) as store:
        assert store.clip_ids[:3] == [clip_id(5), clip_id(2), clip_id(0)]
        for name in ("logmel", "timm/test_vit"):
            assert {store.clip_ids[r] for r in np.flatnonzero(store.done_mask(name))} == \
                {clip_id(i) for i in (5, 2, 0, 6, 3, 1)}
    third = extract(shuffled, path, ENCODERS, **QUICK)
    assert (third.clips_done, third.clips_skipped) == (1, 6)
    assert_done_rows_are_their_own(path, seven, encoders)
    clean = tmp_path / "clean.zarr"
    extract(seven, clean, ENCODERS, **QUICK)
    with open_store(path) as got, open_store(clean) as ref:
        for name in ("logmel", "timm/test_vit"):
            for cid in seven.clip_ids:
                np.testing.assert_allclose(got.get(name, cid).astype(np.float32),
                                           ref.get(name, cid).astype(np.float32), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("on_device", [False, True], ids=["preprocess-in-workers", "uint8-frames-to-lane"])
def test_clips_of_several_rates_sizes_and_frame_rates_in_one_batch(encoders, tmp_path, monkeypatch, on_device):
    monkeypatch.setattr(extract_workers, "PREPROCESS_ON_DEVICE", on_device)
    manifest = make_dataset(tmp_path / "mixed", 6)
    kinds = [(48000, 4, (48, 64)), (16000, 5, (32, 40)), (44100, 4, (48, 64)), (22050, 3, (40, 56)),
             (48000, 5, (32, 40)), (8000, 4, (48, 64))]
    for i, (rate, fps, size) in enumerate(kinds):
        write_wav(manifest.root / manifest.clips[i].audio, 2.0, seed=10 + i, rate=rate)
        write_mp4(manifest.root / manifest.clips[i].video, 2.0, seed=10 + i, fps=fps, size=size)
    path = tmp_path / "mixed.zarr"
    summary = extract(manifest, path, ENCODERS, **{**QUICK, "batch_size": 4, "chunk_clips": 2})
    assert summary.exit_code == 0 and summary.clips_done == 6
    done = assert_done_rows_are_their_own(path, manifest, encoders)
    assert done["logmel"] == done["timm/test_vit"] == set(manifest.clip_ids)


def test_a_clip_without_video_fails_for_the_video_set_only(seven, encoders, tmp_path):
    clips = [c if i != 2 else replace(c, video=None)
             for i, c in enumerate(seven.clips[:4])]
    manifest = replace(seven, clips=clips)
    path = tmp_path / "novideo.zarr"
    summary = extract(manifest, path, ENCODERS, **QUICK)
    assert summary.exit_code == 1 and list(summary.failures) == [clip_id(2)]
    assert list(summary.failures[clip_id(2)]) == ["timm/test_vit"]
    done = assert_done_rows_are_their_own(path, manifest, encoders)
    assert done["logmel"] == set(manifest.clip_ids)
    assert done["timm/test_vit"] == set(manifest.clip_ids) - {clip_id(2)}
    with open_store(path) as store:
        assert "no video file listed" in store.errors("timm/test_vit")[clip_id(2)]


def test_a_store_write_failing_mid_run_keeps_only_whole_rows_and_the_rerun_equals_a_clean_run(
        seven, encoders, tmp_path, monkeypatch):
    clean = tmp_path / "clean.zarr"
    extract(seven, clean, ENCODERS, **QUICK)
    real = FeatureStore.write_rows
    calls = []

    def failing(self, name, start, data, *args, **kwargs):
        calls.append((name, start))
        if len(calls) == 3:  # the third chunk write: disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, start, data, *args, **kwargs)

    monkeypatch.setattr(FeatureStore, "write_rows", failing)
    path = tmp_path / "fail.zarr"
    with pytest.raises(StoreWriteError):
        extract(seven, path, ENCODERS, **QUICK)
    monkeypatch.setattr(FeatureStore, "write_rows", real)
    done = assert_done_rows_are_their_own(path, seven, encoders)
    assert 0 < sum(map(len, done.values())) < 14
    again = extract(seven, path, ENCODERS, **QUICK)
    assert again.exit_code == 0
    assert_same_arrays(read_all(path), read_all(clean))


@pytest.mark.parametrize("change", [dict(frames=3), dict(encoder_options={"logmel": {"n_mels": 64}}),
                                    dict(encoders="logmel,timm/test_vit@none:1")],
                         ids=["frames", "logmel-option", "vit-seed"])
@pytest.mark.parametrize("all_done", [True, False], ids=["all-done", "part-done"])
def test_another_configuration_under_the_same_name_is_refused_and_changes_nothing(seven, tmp_path, change,
                                                                                    all_done):
    manifest = replace(seven, clips=seven.clips[:3])
    path = tmp_path / "cfg.zarr"
    extract(manifest, path, ENCODERS, **{**QUICK, "limit": None if all_done else 2})
    before = read_all(path)
    kwargs = {"encoders": ENCODERS, **QUICK, **change}
    with pytest.raises(FingerprintMismatchError):
        extract(manifest, path, **kwargs)
    assert_same_arrays(read_all(path), before)
    with open_store(path) as store:
        assert store.n_clips == 3 and store.verify().ok


def test_partial_commits_after_every_batch_with_unequal_chunks_and_a_broken_clip(seven, encoders, tmp_path):
    data = copy_dataset(seven, tmp_path / "data")
    wav = data.root / data.clips[2].audio
    wav.write_bytes(b"RIFF" + b"\x00" * 60)  # garbage audio inside the first logmel chunk
    path = tmp_path / "commits.zarr"
    run = {**QUICK, "chunk_clips": {"logmel": 4, "timm/test_vit": 2}, "commit_seconds": 1e-6}
    summary = extract(data, path, ENCODERS, **run)
    assert summary.exit_code == 1 and list(summary.failures) == [clip_id(2)]
    done = assert_done_rows_are_their_own(path, data, encoders)
    assert done["logmel"] == set(data.clip_ids) - {clip_id(2)} and done["timm/test_vit"] == set(data.clip_ids)
    write_wav(wav, 2.0, seed=2)
    assert extract(data, path, ENCODERS, **run).clips_done == 1
    done = assert_done_rows_are_their_own(path, data, encoders)
    assert done["logmel"] == set(data.clip_ids)
    with open_store(path) as store:
        assert not store.errors("logmel")
