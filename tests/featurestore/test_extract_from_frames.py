"""Image encoders read decoded frames from the store (``extract(frames_from=)``, issue 21 item 2).

One extraction of ``frames/32`` decodes the videos; then the video folder is moved away and image
encoders are extracted from the stored frames: their features must be the encoder applied to the
frames ``store.get_many`` returns, bit for bit on the CPU, under a fingerprint of their own.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from tests.featurestore.test_extract_support import clip_id, make_dataset

from featurestore.cli import main
from featurestore.encoders import create_encoder
from featurestore.errors import FingerprintMismatchError
from featurestore.extract import extract
from featurestore.store import open_store

RUN = dict(device="cpu", batch_size=4, num_workers=0, chunk_clips=4, progress=False)
VIT = "timm/test_vit@none"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Four 2 s clips (2 frames each) with a ``frames/32`` set extracted from their MP4s; the
    store is copied per test."""
    root = tmp_path_factory.mktemp("from_frames")
    manifest = make_dataset(root / "data", 4)
    store = root / "frames.zarr"
    summary = extract(manifest, store, "frames/32", **RUN)
    assert summary.clips_done == 4
    return manifest, store


def _store_copy(dataset, tmp_path):
    manifest, store = dataset
    copy = tmp_path / "s.zarr"
    shutil.copytree(store, copy)
    return manifest, copy


def _expected(store_path, ids: list[str], batch: int | None = None) -> np.ndarray:
    """The encoder applied directly to the stored frames, in encode batches of ``batch`` clips (the
    run's; default: all of them in one)."""
    encoder = create_encoder(VIT, "cpu")
    with open_store(store_path) as store:
        frames = store.get_many("frames/32", ids)  # [n, K, 3, S, S] uint8
    pre = encoder.preprocessor()
    x = torch.cat([pre(np.ascontiguousarray(f.transpose(0, 2, 3, 1))) for f in frames])
    step = (batch or len(ids)) * frames.shape[1]
    with torch.no_grad():
        out = torch.cat([encoder.encode(x[i:i + step]) for i in range(0, len(x), step)]).float().numpy()
    return out.reshape(len(ids), frames.shape[1], *encoder.output_shape).astype(encoder.dtype)


def test_features_from_stored_frames_equal_the_encoder_on_them_and_open_no_video(dataset, tmp_path):
    manifest, store = _store_copy(dataset, tmp_path)
    (manifest.root / "video").rename(tmp_path / "video_moved")  # any video opened would fail its clip
    try:
        summary = extract(manifest, store, VIT, frames_from="frames/32", **RUN)
    finally:
        (tmp_path / "video_moved").rename(manifest.root / "video")
    assert (summary.clips_done, summary.clips_failed) == (4, 0)
    assert "decode frames from frames/32" in summary.stage_seconds and "decode frames" not in summary.stage_seconds
    ids = [clip_id(i) for i in range(4)]
    with open_store(store) as fs:
        got = fs.get_many("timm/test_vit", ids)
        info = fs.feature_info("timm/test_vit")
        frames_fp = fs.feature_info("frames/32").fingerprint
    np.testing.assert_array_equal(got, _expected(store, ids))
    assert info.provenance["frames_from"] == {"set": "frames/32", "fingerprint": frames_fp}


def test_stored_frames_features_never_share_the_fingerprint_of_decoded_ones(dataset, tmp_path):
    manifest, store = _store_copy(dataset, tmp_path)
    extract(manifest, store, {"from_frames": VIT}, frames_from="frames/32", **RUN)
    extract(manifest, store, {"from_mp4": VIT}, **RUN)
    with open_store(store) as fs:
        stored, decoded = fs.feature_info("from_frames"), fs.feature_info("from_mp4")
        assert stored.fingerprint != decoded.fingerprint and "frames_from" not in decoded.provenance
        # the squashed 32x32 frames are not the 48x64 decoded ones: the features differ too
        assert not np.array_equal(fs.get_many("from_frames", [clip_id(0)]), fs.get_many("from_mp4", [clip_id(0)]))
    # the same name asked from MP4s after stored frames is a fingerprint mismatch, not a resume
    with pytest.raises(FingerprintMismatchError, match="from_frames"):
        extract(manifest, store, {"from_frames": VIT}, **RUN)


def test_cli_flag_extracts_from_stored_frames_and_a_rerun_has_nothing_to_do(dataset, tmp_path, capsys):
    manifest, store = _store_copy(dataset, tmp_path)
    args = ["extract", str(manifest.root), str(store), "--encoders", VIT, "--frames-from", "frames/32",
            "--device", "cpu", "--frames", "2", "--num-workers", "0", "--batch-size", "4", "--quiet"]
    (manifest.root / "video").rename(tmp_path / "video_moved")
    try:
        assert main(args) == 0
        assert main(args) == 0  # resumed: nothing left
    finally:
        (tmp_path / "video_moved").rename(manifest.root / "video")
    first, second = [line for line in capsys.readouterr().out.splitlines() if line.startswith("extract:")]
    assert "4 clips done, 0 skipped, 0 failed" in first
    assert "0 clips done, 4 skipped" in second and "nothing to do" in second  # told from the store alone
    with open_store(store) as fs:
        ids = [clip_id(i) for i in range(4)]
        np.testing.assert_array_equal(fs.get_many("timm/test_vit", ids), _expected(store, ids))


@pytest.mark.parametrize("kwargs, message", [
    (dict(frames_from="frames/64"), "has no feature set 'frames/64'"),
    (dict(frames_from="frames/32", frames=3), "holds 2 frames per clip, this run asks for 3"),
    (dict(frames_from="frames/32", encoders="logmel"), "encoder logmel is not an image encoder"),
    (dict(frames_from="frames/32", encoders="frames/16"), "encoder frames/16 is not an image encoder"),
])
def test_refusals_are_one_line_before_any_work(dataset, tmp_path, kwargs, message):
    manifest, store = _store_copy(dataset, tmp_path)
    encoders = kwargs.pop("encoders", VIT)
    with pytest.raises(ValueError, match=message) as err:
        extract(manifest, store, encoders, **kwargs, **RUN)
    assert "\n" not in str(err.value) and str(store) in str(err.value)
    with open_store(store) as fs:
        assert set(fs.feature_sets()) == {"frames/32"}


def test_clips_the_frames_set_has_not_done_are_refused_by_name(dataset, tmp_path):
    manifest, _ = dataset
    store = tmp_path / "part.zarr"
    extract(manifest, store, "frames/32", limit=2, **RUN)
    with pytest.raises(ValueError, match=rf"not done for 2 of the 4 selected clips \(e.g. {clip_id(2)}, "
                                         rf"{clip_id(3)}\)"):
        extract(manifest, store, VIT, frames_from="frames/32", **RUN)
    summary = extract(manifest, store, VIT, frames_from="frames/32", limit=2, **RUN)
    assert summary.clips_done == 2


def test_dask_tasks_read_the_stored_frames_too(dataset, tmp_path):
    """``frames_from`` with a scheduler: each task's decoder opens the store read-only itself. An
    in-process cluster (two worker threads, two tasks of two clips) keeps it cheap; the features
    equal the encoder on the stored frames, batch by batch, with no video opened."""
    distributed = pytest.importorskip("distributed")
    manifest, store = _store_copy(dataset, tmp_path)
    (manifest.root / "video").rename(tmp_path / "video_moved")
    try:
        with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0",
                                      worker_dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
            summary = extract(manifest, store, VIT, frames_from="frames/32", scheduler=client,
                              **{**RUN, "batch_size": 2, "chunk_clips": 2})
    finally:
        (tmp_path / "video_moved").rename(manifest.root / "video")
    assert (summary.clips_done, summary.clips_failed) == (4, 0) and summary.device.startswith("dask")
    ids = [clip_id(i) for i in range(4)]
    with open_store(store) as fs:
        got = fs.get_many("timm/test_vit", ids)
        assert fs.feature_info("timm/test_vit").provenance["frames_from"]["set"] == "frames/32"
    np.testing.assert_array_equal(got, _expected(store, ids, batch=2))
