"""The torchcodec decoder (issue 21 item 5): the PyAV sampler's frames, at its times, on the CPU.

torchcodec's CPU decoder is compared with ``sample_frames`` on real H.264 files written here (a
clip whose frame i is a flat grey of its own, so the chosen frame can be read off its level, and a
textured camera-like clip, in MP4, MOV and Matroska): the same frames, bit for bit. Extraction with
``decoder="torchcodec"`` stores the PyAV run's features under the same fingerprint; decoding on
CUDA (NVDEC, whose RGB differs) is recorded in the fingerprint. Skipped where torchcodec cannot
load (not installed, or no FFmpeg 4-9 shared libraries): the refusal is tested then instead.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from tests.featurestore.test_decode import _frame_indices, _video
from tests.featurestore.test_extract_support import clip_id, make_dataset
from tests.scripts_support import script_module

from featurestore.decode import DecodeError, sample_frames
from featurestore.decode import torchcodec_video as tcv
from featurestore.extract import extract
from featurestore.extract.plan import Source
from featurestore.store import open_store

VIT = "timm/test_vit@none"


def _unavailable() -> str:
    try:
        tcv.check_decoder("torchcodec")
    except tcv.DecoderUnavailable as err:
        return str(err)
    return ""


needs_torchcodec = pytest.mark.skipif(bool(_unavailable()), reason=_unavailable() or "available")


@pytest.fixture(scope="module")
def write_clip():
    with script_module("bench/bench_frames.py") as module:
        yield module.write_clip


@needs_torchcodec
@pytest.mark.parametrize("suffix", [".mp4", ".mov", ".mkv"])
def test_the_same_frames_are_chosen_as_by_the_pyav_sampler(tmp_path, suffix):
    path = _video(tmp_path / f"grey{suffix}", gop=5)  # frame i: grey level 10 + 12 i; B-frames on
    for n in (1, 3, 7, 12):
        got = tcv.sample_frames_torchcodec(path, n)
        want = sample_frames(path, n)
        assert got.shape == want.shape and got.dtype.is_floating_point is False
        assert _frame_indices(got.numpy()) == _frame_indices(want)
        np.testing.assert_array_equal(got.numpy(), want)


@needs_torchcodec
@pytest.mark.parametrize("gop", [6, 250])
def test_textured_frames_are_equal_bit_for_bit(tmp_path, write_clip, gop):
    path = write_clip(tmp_path / "clip.mp4", gop, width=96, height=64, seconds=3.0)
    np.testing.assert_array_equal(tcv.sample_frames_torchcodec(path, 12).numpy(), sample_frames(path, 12))


@needs_torchcodec
def test_other_containers_and_bad_files_are_decode_errors_naming_the_file(tmp_path):
    ts = _video(tmp_path / "a.ts", fmt="mpegts")
    with pytest.raises(DecodeError, match="'mpegts'.*default decoder") as err:
        tcv.sample_frames_torchcodec(ts, 3)
    assert err.value.path == ts
    garbage = tmp_path / "bad.mp4"
    garbage.write_bytes(b"not a video" * 100)
    with pytest.raises(DecodeError, match="unreadable video") as err:
        tcv.sample_frames_torchcodec(garbage, 3)
    assert err.value.path == garbage


def test_an_unknown_decoder_and_a_missing_torchcodec_are_one_line_refusals(monkeypatch, tmp_path, capsys):
    from featurestore.cli import main

    with pytest.raises(ValueError, match="decoder must be one of pyav, torchcodec, got 'nvdec'"):
        extract(tmp_path / "none", tmp_path / "s.zarr", "frames/32", decoder="nvdec", progress=False)
    tcv._video_decoder_class.cache_clear()
    monkeypatch.setitem(sys.modules, "torchcodec", None)  # what an environment without the extra sees
    try:
        with pytest.raises(tcv.DecoderUnavailable, match=r"torchcodec is not installed .*avscene\[torchcodec\]"):
            tcv.check_decoder("torchcodec")
        assert main(["extract", str(tmp_path / "data"), str(tmp_path / "s.zarr"), "--decoder", "torchcodec"]) == 2
    finally:
        tcv._video_decoder_class.cache_clear()
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("featurestore extract: error: decoder 'torchcodec': torchcodec is not")
    assert not (tmp_path / "s.zarr").exists()


def test_only_frames_decoded_on_cuda_carry_the_decoder_in_the_fingerprint():
    assert Source("frames", 12, decoder="torchcodec", decode_device="cpu").scheme() == Source("frames", 12).scheme()
    cuda = Source("frames", 12, decoder="torchcodec", decode_device="cuda:0").scheme()
    assert cuda == {"kind": "frames", "n_frames": 12, "decoder": "torchcodec/cuda"}
    assert Source("frames", 12, decoder="torchcodec").key != Source("frames", 12).key


def test_only_decoding_on_cuda_moves_decoding_into_threads_of_the_main_process():
    """A forked decode worker cannot use its parent's CUDA context: ``extract`` then decodes in
    threads (``run_blocks(num_workers=0, decode_threads=)``)."""
    from types import SimpleNamespace

    from featurestore.extract.workers import decodes_on_device

    def plan(*sources: Source) -> SimpleNamespace:
        return SimpleNamespace(sources=lambda: {s.key: s for s in sources})

    audio = Source("audio", 10, 48000, 1.0)
    assert not decodes_on_device(plan(audio, Source("frames", 12)))
    assert not decodes_on_device(plan(audio, Source("frames", 12, decoder="torchcodec", decode_device="cpu")))
    assert decodes_on_device(plan(audio, Source("frames", 12, decoder="torchcodec", decode_device="cuda:0")))


@needs_torchcodec
def test_extraction_with_torchcodec_stores_the_pyav_paths_features_under_its_fingerprint(tmp_path, monkeypatch):
    """One run, two encoders: the parameter-free frames/32 (preprocessed in the worker from the frame
    tensor as an array) and an image encoder fed the frame tensor itself; both equal the encoders
    applied to ``sample_frames``' frames (PyAV), and the frames scheme records no decoder."""
    from featurestore.encoders import create_encoder
    from featurestore.extract import workers

    manifest = make_dataset(tmp_path / "data", 3)
    monkeypatch.setattr(workers, "PREPROCESS_ON_DEVICE", True)  # the image encoder reads the frame tensor
    summary = extract(manifest, tmp_path / "tc.zarr", f"frames/32,{VIT}", device="cpu", batch_size=3,
                      chunk_clips=4, num_workers=0, progress=False, decoder="torchcodec")
    assert (summary.clips_done, summary.clips_failed) == (3, 0)
    ids = [clip_id(i) for i in range(3)]
    decoded = [sample_frames(manifest.root / clip.video, 2) for clip in manifest.clips]
    with open_store(tmp_path / "tc.zarr") as fs:
        for spec in ("frames/32", VIT):
            encoder = create_encoder(spec, "cpu")
            x = torch.cat([encoder.preprocessor()(frames) for frames in decoded])  # one encode batch, the run's
            with torch.no_grad():
                want = encoder.encode(x).float().numpy().astype(encoder.dtype)
            name = spec.split("@")[0]
            np.testing.assert_array_equal(fs.get_many(name, ids), want.reshape(3, 2, *encoder.output_shape))
            assert fs.feature_info(name).provenance["segments"] == {"kind": "frames", "n_frames": 2}


@needs_torchcodec
def test_a_rerun_with_torchcodec_is_checked_by_fingerprint_and_resumes_a_pyav_run_on_the_cpu(tmp_path):
    """Told from the store alone, a PyAV run would look done; with torchcodec the full check decides
    (on CUDA the fingerprint differs). On the CPU it is the same fingerprint: everything is skipped."""
    from featurestore.extract.request import NO_DEVICE

    manifest = make_dataset(tmp_path / "data", 2)
    run = dict(device="cpu", batch_size=2, chunk_clips=2, num_workers=0, progress=False)
    extract(manifest, tmp_path / "s.zarr", "frames/32", **run)
    assert extract(manifest, tmp_path / "s.zarr", "frames/32", **run).device == NO_DEVICE
    again = extract(manifest, tmp_path / "s.zarr", "frames/32", decoder="torchcodec", **run)
    assert (again.clips_done, again.clips_skipped, again.device) == (0, 2, "cpu")
