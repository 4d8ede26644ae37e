"""Hostile review of the local extraction pipeline: every done row is its own clip's encoding.

The encoders here are exact "signature" encoders (per segment / frame statistics of the decoded
input), so that any row/clip misalignment (a batch mixing clips of several blocks, a clip failing
mid-batch, frames of two sizes in one batch, a reused shared buffer, partial commits) shows as a
mismatch against the encoder run on that clip's own files alone. Every run is compared row by row
with that per-clip reference, whatever the workers, batch and chunk sizes.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.featurestore.test_extract_support import clip_id, make_dataset, write_mp4

import featurestore.extract.workers as extract_workers
from featurestore.decode import load_audio_segments, sample_frames
from featurestore.encoders import AudioSegments, Encoder, FramePreprocessor
from featurestore.extract import extract
from featurestore.store import open_store

N_CLIPS = 9
BROKEN = (3, 7)  # clips whose files hold garbage: their rows fail, never the neighbours'
ODD_SIZE = 5  # a clip whose video is 40x56 instead of 48x64 (two frame sizes in one decode batch)


class AudioSignature(Encoder):
    """Per 1 s segment at 16 kHz: mean, std, max, min, and the first two samples (exact, row-local)."""

    modality = "audio"
    dtype = "float32"

    def __init__(self, spec: str = "audiosig") -> None:
        super().__init__(spec)
        self.sample_rate, self.segment_seconds = 16000, 1.0

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (6,)

    def config(self) -> dict:
        return {}

    def preprocessor(self) -> AudioSegments:
        return AudioSegments(samples=16000, sample_rate=16000)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.stack([batch.mean(1), batch.std(1), batch.amax(1), batch.amin(1), batch[:, 0], batch[:, 1]], 1)


class VideoSignature(Encoder):
    """Per frame, after a real ``FramePreprocessor`` (so the uint8 device path runs too): the mean of
    each channel and the first pixel (exact, row-local)."""

    modality = "video"
    dtype = "float32"

    def __init__(self, spec: str = "videosig") -> None:
        super().__init__(spec)

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (6,)

    def config(self) -> dict:
        return {}

    def preprocessor(self) -> FramePreprocessor:
        return FramePreprocessor(crop=(16, 16), resize=16, interpolation="bilinear", mean=(0.5,) * 3,
                                 std=(0.25,) * 3)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([batch.mean(dim=(2, 3)), batch[:, :, 0, 0]], 1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Nine 2 s clips; two with garbage files, one with a video of another frame size."""
    root = tmp_path_factory.mktemp("hostile_pipeline")
    manifest = make_dataset(root, N_CLIPS)
    for i in BROKEN:
        (root / "audio" / f"{clip_id(i)}.wav").write_bytes(b"RIFF" + bytes(range(200)))
        (root / "video" / f"{clip_id(i)}.mp4").write_bytes(bytes(range(256)) * 4)
    write_mp4(root / "video" / f"{clip_id(ODD_SIZE)}.mp4", 2.0, seed=ODD_SIZE, size=(40, 56))
    return manifest


def reference(manifest, encoder: Encoder, i: int) -> np.ndarray:
    """``encoder`` run on clip ``i``'s own file alone."""
    clip = manifest.clips[i]
    if encoder.modality == "audio":
        raw = load_audio_segments(manifest.root / clip.audio, encoder.sample_rate, 2, 1.0)
    else:
        raw = sample_frames(manifest.root / clip.video, 2)
    return encoder.encode(encoder.preprocessor()(raw)).numpy()


def assert_rows_are_their_own_clips(manifest, store_path: Path, encoders: list[Encoder],
                                    broken: tuple[int, ...] = BROKEN) -> None:
    """Every good clip done with exactly its own encoding; every broken one failed and not done."""
    with open_store(store_path) as store:
        for encoder in encoders:
            done = store.done_mask(encoder.name)
            for i, clip in enumerate(manifest.clips):
                row = store.row(clip.clip_id)
                if i in broken:
                    assert not done[row], f"{encoder.name}: broken clip {i} marked done"
                    continue
                assert done[row], f"{encoder.name}: clip {i} not done"
                got = store.get(encoder.name, clip.clip_id)
                np.testing.assert_allclose(got, reference(manifest, encoder, i), rtol=1e-6, atol=1e-6,
                                           err_msg=f"{encoder.name}: clip {i} holds another clip's row")


@pytest.mark.parametrize("num_workers,batch_size,chunk_clips,on_device", [
    (0, 1, 2, False), (0, 4, 3, True), (2, 3, 2, False), (2, 4, 5, True), (3, 2, {"audiosig": 2, "videosig": 3}, True),
    (2, 5, {"audiosig": 4, "videosig": 2}, False),
])
def test_every_done_row_is_the_encoder_on_its_own_clip(dataset, tmp_path, monkeypatch, num_workers, batch_size,
                                                         chunk_clips, on_device):
    monkeypatch.setattr(extract_workers, "PREPROCESS_ON_DEVICE", on_device)
    encoders = [AudioSignature(), VideoSignature()]
    summary = extract(dataset, tmp_path / "s.zarr", encoders, device="cpu", batch_size=batch_size,
                      num_workers=num_workers, chunk_clips=chunk_clips, progress=False)
    assert (summary.clips_done, summary.clips_failed) == (N_CLIPS - len(BROKEN), len(BROKEN))
    assert_rows_are_their_own_clips(dataset, tmp_path / "s.zarr", [AudioSignature(), VideoSignature()])


def test_partial_commits_every_batch_keep_rows_with_their_clips(dataset, tmp_path):
    encoders = [AudioSignature(), VideoSignature()]
    summary = extract(dataset, tmp_path / "s.zarr", encoders, device="cpu", batch_size=2, num_workers=2,
                      chunk_clips=8, progress=False, commit_seconds=1e-9)
    assert summary.clips_done == N_CLIPS - len(BROKEN)
    assert_rows_are_their_own_clips(dataset, tmp_path / "s.zarr", [AudioSignature(), VideoSignature()])


class ScalesInPlace(AudioSignature):
    """A plugin that normalises its batch in place (``batch.mul_``) before taking the signature. Its
    preprocessor equals ``AudioSignature``'s, so in a run with both they share one decoded tensor."""

    def __init__(self, spec: str = "inplace") -> None:
        super().__init__(spec)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return super().forward(batch.mul_(2.0))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_encoder_that_changes_its_shared_input_in_place_is_refused_before_another_reads_it(dataset, tmp_path,
                                                                                               num_workers):
    """Before: the encoders after it silently stored features of the doubled audio (2x the truth)."""
    from featurestore.testing import EncoderContractError

    with pytest.raises(EncoderContractError, match=r"inplace.*changed its input batch in place"):
        extract(dataset, tmp_path / "s.zarr", [ScalesInPlace(), AudioSignature()], device="cpu", batch_size=2,
                num_workers=num_workers, chunk_clips=2, progress=False)
    with open_store(tmp_path / "s.zarr") as store:  # nothing of the encoder read after it is wrong
        done = store.done_mask("audiosig")
        for i in np.flatnonzero(done):
            np.testing.assert_allclose(store.get("audiosig", store.clip_ids[i]),
                                       reference(dataset, AudioSignature(), i), rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def extracted(dataset, tmp_path_factory):
    """The dataset extracted with real encoders (batches of 2, chunks of 4, two decode workers)."""
    path = tmp_path_factory.mktemp("hostile_pipeline_store") / "s.zarr"
    extract(dataset, path, "logmel,timm/test_vit@none,frames/32", device="cpu", batch_size=2, num_workers=2,
            chunk_clips=4, progress=False)
    return path


@pytest.mark.parametrize("num_workers,batch_size", [(0, 3), (2, 4)])
def test_encoding_files_outside_a_store_gives_the_stored_rows_bit_for_bit(dataset, extracted, num_workers,
                                                                          batch_size):
    from featurestore.encode_files import FileEncoder

    names = ["logmel", "timm/test_vit", "frames/32"]
    with open_store(extracted) as store:
        encoder = FileEncoder({n: store.feature_info(n).provenance for n in names}, "cpu", batch_size=batch_size,
                              num_workers=num_workers)
        files = [dataset.root / c.audio for c in dataset.clips] + [dataset.root / c.video for c in dataset.clips]
        result = encoder.encode(files[::-1])  # another order than the store's
        failed = {clip_id(i) for i in BROKEN}
        assert set(result.errors) == failed
        ok_ids = [c.name for c in result.ok_clips]
        assert sorted(ok_ids) == sorted(c.clip_id for c in dataset.clips if c.clip_id not in failed)
        for name in names:
            np.testing.assert_array_equal(result.features[name], store.get_many(name, ok_ids), err_msg=name)


def test_a_feature_set_made_from_stored_frames_is_refused_for_files_naming_why(dataset, extracted, tmp_path):
    """Before: 'gives another configuration ... made with other encoder options or another version'."""
    import shutil

    from featurestore.encode_files import EncoderRebuildError, FileEncoder

    path = tmp_path / "s.zarr"
    shutil.copytree(extracted, path)
    good = replace(dataset, clips=[c for i, c in enumerate(dataset.clips) if i not in BROKEN])
    extract(good, path, {"vit_frames": "timm/test_vit@none"}, frames_from="frames/32", device="cpu",
            batch_size=2, num_workers=0, chunk_clips=4, progress=False)
    with open_store(path) as store:
        provenance = store.feature_info("vit_frames").provenance
    with pytest.raises(EncoderRebuildError, match=r"'vit_frames' was encoded from the stored frames set 'frames/32'"):
        FileEncoder({"vit_frames": provenance}, "cpu")


def _done_in_all(store, names: list[str]) -> set[str]:
    done = np.logical_and.reduce([store.done_mask(n) for n in names])
    return {store.clip_ids[i] for i in np.flatnonzero(done)}


def test_summary_counts_are_what_the_store_holds_across_a_failed_run_and_its_repair(tmp_path):
    """A first run with two broken clips and a partial commit after every batch, then the files
    repaired and a rerun: each summary's counts and failures are exactly the store's done flags and
    errors, and the repaired clips' rows are their own encodings."""
    from tests.featurestore.test_extract_support import write_wav

    manifest = make_dataset(tmp_path / "data", 6)
    broken = (1, 4)
    for i in broken:
        (tmp_path / "data" / "audio" / f"{clip_id(i)}.wav").write_bytes(b"RIFF" + bytes(100))
    names = ["audiosig", "videosig"]
    run = dict(device="cpu", batch_size=2, num_workers=2, chunk_clips=4, progress=False, commit_seconds=1e-9)
    first = extract(manifest, tmp_path / "s.zarr", [AudioSignature(), VideoSignature()], **run)
    with open_store(tmp_path / "s.zarr") as store:
        assert first.clips_done == len(_done_in_all(store, names)) == 4
        assert set(first.failures) == set(store.errors("audiosig")) == {clip_id(i) for i in broken}
        assert first.features["audiosig"].written == 4 and first.features["videosig"].written == 6
        assert not store.errors("videosig")
    for i in broken:
        write_wav(tmp_path / "data" / "audio" / f"{clip_id(i)}.wav", 2.0, seed=i)
    second = extract(manifest, tmp_path / "s.zarr", [AudioSignature(), VideoSignature()], **run)
    assert (second.clips_done, second.clips_skipped, second.clips_failed) == (2, 4, 0)
    assert second.features["audiosig"].written == 2 and second.features["videosig"].written == 0
    with open_store(tmp_path / "s.zarr") as store:
        assert len(_done_in_all(store, names)) == 6 and not store.errors("audiosig")
    assert_rows_are_their_own_clips(manifest, tmp_path / "s.zarr", [AudioSignature(), VideoSignature()], broken=())


#: How a dead decode worker is named (torch words it two ways; a batch lost with it is a third).
DIED = r"decode worker \(pid \d+\) (was killed by signal|exited unexpectedly)|a decode worker died"


def _worker_fault_at(monkeypatch, row: int, fault: str) -> None:
    """Decode workers (forked after this) SIGKILL themselves, or hang, when they reach ``row``; the
    main process decodes as usual."""
    import os
    import signal

    import torch.utils.data._utils as loader_utils

    monkeypatch.setattr(loader_utils, "MP_STATUS_CHECK_INTERVAL", 0.5)  # the hung worker is terminated sooner
    main, decode = os.getpid(), extract_workers.ClipDecoder.__getitem__

    def faulty(self, r: int):
        if os.getpid() != main and r == row:
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)
        return decode(self, r)

    monkeypatch.setattr(extract_workers.ClipDecoder, "__getitem__", faulty)


@pytest.mark.parametrize("fault, said", [("kill", DIED),
                                         ("hang", r"no decoded batch arrived")])
def test_a_decode_worker_that_dies_or_hangs_while_encoding_files_is_one_line(dataset, extracted, monkeypatch, fault,
                                                                            said):
    """Before: torch's raw RuntimeError (its SIGCHLD handler raises in whatever line runs, here the
    encoder's forward, outside the loop that translated it) and, for a hung worker, a wait for ever."""
    from featurestore.encode_files import FileEncoder
    from featurestore.extract import pipeline
    from featurestore.extract.errors import DecodeWorkerError

    with open_store(extracted) as store:
        provenance = {"logmel": store.feature_info("logmel").provenance}
    encoder = FileEncoder(provenance, "cpu", batch_size=1, num_workers=2)
    logmel = encoder.targets[0].encoder
    forward = logmel.forward

    def slow_forward(batch: torch.Tensor) -> torch.Tensor:  # the worker dies while this thread encodes
        time.sleep(0.5)
        return forward(batch)

    monkeypatch.setattr(logmel, "forward", slow_forward)
    monkeypatch.setattr(pipeline, "DECODE_TIMEOUT_S", 2.0)
    _worker_fault_at(monkeypatch, 4, fault)  # asked for once the first batch is taken: it dies mid-encoding
    files = [dataset.root / dataset.clips[i].audio for i in (0, 1, 2, 4, 5, 6)]
    with pytest.raises(DecodeWorkerError, match=said) as caught:
        encoder.encode(files)
    assert "\n" not in str(caught.value) and "num_workers=0" in str(caught.value)


@pytest.mark.parametrize("fault, said", [("kill", DIED + r"|no decoded batch arrived"),  # torch sees a death late at times
                                         ("hang", r"no decoded batch arrived")])
def test_a_decode_worker_that_dies_or_hangs_mid_run_keeps_only_right_rows(dataset, tmp_path, monkeypatch, fault,
                                                                         said):
    from featurestore.extract import pipeline
    from featurestore.extract.errors import DecodeWorkerError

    monkeypatch.setattr(pipeline, "DECODE_TIMEOUT_S", 2.0)
    _worker_fault_at(monkeypatch, 6, fault)
    with pytest.raises(DecodeWorkerError, match=said):
        extract(dataset, tmp_path / "s.zarr", [AudioSignature(), VideoSignature()], device="cpu", batch_size=1,
                num_workers=2, chunk_clips=2, progress=False)
    with open_store(tmp_path / "s.zarr") as store:
        assert store.verify().ok
        for encoder in (AudioSignature(), VideoSignature()):
            for i in np.flatnonzero(store.done_mask(encoder.name)):
                np.testing.assert_allclose(store.get(encoder.name, store.clip_ids[i]),
                                           reference(dataset, encoder, i), rtol=1e-6, atol=1e-6)
    monkeypatch.undo()
    # the rerun decodes in this process: decode workers forked again by a long-lived pytest worker after
    # a hung one once waited for ever (noted; not reproduced alone), and the rerun checks the rows
    extract(dataset, tmp_path / "s.zarr", [AudioSignature(), VideoSignature()], device="cpu", batch_size=1,
            num_workers=0, chunk_clips=2, progress=False)
    assert_rows_are_their_own_clips(dataset, tmp_path / "s.zarr", [AudioSignature(), VideoSignature()])


class LoudnessLevel(AudioSignature):
    """A quantised plugin stored as uint8, per segment: 128 + 40 x mean/std, and the DC level in dB
    (20 log10 of 1e4 x mean). A clip with a strong DC offset gives a level past 255; a negative mean
    gives log10 of a negative number, NaN: neither can be stored as uint8."""

    dtype = "uint8"

    def __init__(self, spec: str = "level") -> None:
        super().__init__(spec)

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (2,)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        mean = batch.mean(1)
        return torch.stack([128 + 40 * mean / batch.std(1), 20 * torch.log10(1e4 * mean)], 1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_integer_feature_set_never_stores_nan_or_an_out_of_range_level_as_done(tmp_path, num_workers):
    """Before: NaN cast to uint8 (0, with a numpy warning) and 1126 wrapped to 102, both marked
    done, while a float feature set fails such a row ("non-finite output")."""
    from featurestore import demo

    manifest = make_dataset(tmp_path / "data", 6)
    rng = np.random.default_rng(3)
    loud = (0.5 + 0.05 * rng.standard_normal((96000, 2))).astype(np.float32)  # mean/std ~ 10: level ~ 528
    demo.write_wav(tmp_path / "data" / manifest.clips[3].audio, loud, 48000, subtype="PCM_16")
    expected = [reference(manifest, LoudnessLevel(), i) for i in range(6)]
    storable = [bool(np.isfinite(e).all() and (e >= 0).all() and (e <= 255).all()) for e in expected]
    assert not storable[3] and any(storable) and sum(not ok for ok in storable) >= 2  # NaN and a level past 255
    summary = extract(manifest, tmp_path / "s.zarr", [LoudnessLevel(), AudioSignature()], device="cpu",
                      batch_size=2, num_workers=num_workers, chunk_clips=4, progress=False)
    assert set(summary.failures) == {clip_id(i) for i in range(6) if not storable[i]}
    assert all(list(f) == ["level"] and "from level" in f["level"] and "uint8" in f["level"]
               for f in summary.failures.values()), summary.failures
    with open_store(tmp_path / "s.zarr") as store:
        np.testing.assert_array_equal(store.done_mask("level"), storable)
        assert store.done_mask("audiosig").all()
        for i in np.flatnonzero(storable):
            np.testing.assert_array_equal(store.get("level", clip_id(i)), expected[i].astype(np.uint8))


class DropsLastRow(AudioSignature):
    """A plugin that overrides ``encode`` (skipping the base class's shape check) and loses the last
    row of every batch."""

    def __init__(self, spec: str = "droplast") -> None:
        super().__init__(spec)

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.forward(batch)[:-1]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_encoder_returning_too_few_rows_stops_the_run_naming_it(tmp_path, num_workers):
    """Before: numpy's 'cannot reshape array of size 42 into shape (2,2,6)', a ValueError (exit 2,
    'bad input') naming neither the encoder nor the feature set."""
    from featurestore.testing import EncoderContractError

    manifest = make_dataset(tmp_path / "data", 4)
    with pytest.raises(EncoderContractError, match=r"encoder droplast .* returned shape \(3, 6\) for a batch of 4 "
                                                   r"inputs; expected \(4, 6\)"):
        extract(manifest, tmp_path / "s.zarr", [DropsLastRow()], device="cpu", batch_size=2,
                num_workers=num_workers, chunk_clips=2, progress=False)
    with open_store(tmp_path / "s.zarr") as store:
        assert not store.done_mask("droplast").any()


def test_an_open_store_given_to_extract_sees_every_writer_threads_rows_done(tmp_path, monkeypatch):
    """On an accelerator four writer threads write through handles of their own (simulated here on
    the CPU). Before: the caller's open store kept its cached done flags, so ``done_mask`` said
    6 of the 8 clips the run had just finished were not done (and a search index built from it
    would leave them out)."""
    from featurestore.extract import pipeline

    monkeypatch.setattr(pipeline, "default_writers", lambda store, device: 4)
    manifest = make_dataset(tmp_path / "data", 8)
    run = dict(device="cpu", batch_size=2, num_workers=0, chunk_clips=2, progress=False)
    extract(manifest, tmp_path / "s.zarr", [AudioSignature()], limit=1, **run)
    with open_store(tmp_path / "s.zarr", "a") as store:
        assert store.done_mask("audiosig").sum() == 1  # cached by the handle
        summary = extract(manifest, store, [AudioSignature()], **run)
        assert summary.features["audiosig"].written == 7
        assert store.done_mask("audiosig").all()
    assert_rows_are_their_own_clips(manifest, tmp_path / "s.zarr", [AudioSignature()], broken=())


def test_one_encoder_object_under_two_feature_set_names_is_refused_naming_both(tmp_path):
    """Before: ``{"a": enc, "b": enc}`` filled only ``b`` (the name is set on the object: the last
    one won) and the summary did not mention ``a`` at all."""
    manifest = make_dataset(tmp_path / "data", 2)
    encoder = AudioSignature()
    with pytest.raises(ValueError, match=r"feature sets \['a', 'b'\] are given one and the same Encoder object"):
        extract(manifest, tmp_path / "s.zarr", {"a": encoder, "b": encoder}, device="cpu", progress=False)
    assert not (tmp_path / "s.zarr").exists()
    summary = extract(manifest, tmp_path / "s.zarr", {"a": AudioSignature(), "b": AudioSignature()}, device="cpu",
                      num_workers=0, progress=False)
    assert {n: f.written for n, f in summary.features.items()} == {"a": 2, "b": 2}


@pytest.mark.parametrize("num_workers,batch_size", [(0, 3), (2, 2)])
def test_features_from_stored_frames_are_the_encoder_on_each_clips_own_resized_video(dataset, extracted, tmp_path,
                                                                                     num_workers, batch_size):
    """``frames_from="frames/32"``: each row is the encoder on that clip's own MP4, decoded and resized
    to 32 x 32 as the frames set does it (the odd-sized clip included), whatever the batching."""
    import shutil

    from featurestore.encoders import create_encoder

    path = tmp_path / "s.zarr"
    shutil.copytree(extracted, path)
    good = [i for i in range(N_CLIPS) if i not in BROKEN]
    subset = replace(dataset, clips=[dataset.clips[i] for i in good])
    extract(subset, path, [VideoSignature()], frames_from="frames/32", device="cpu", batch_size=batch_size,
            num_workers=num_workers, chunk_clips=4, progress=False)
    resize = create_encoder("frames/32").preprocessor()
    signature = VideoSignature()
    with open_store(path) as store:
        for i in good:
            frames = resize(sample_frames(dataset.root / dataset.clips[i].video, 2)).numpy()  # [K, 3, S, S]
            expected = signature.encode(signature.preprocessor()(np.ascontiguousarray(frames.transpose(0, 2, 3, 1))))
            np.testing.assert_allclose(store.get("videosig", clip_id(i)), expected.numpy(), rtol=1e-6, atol=1e-6,
                                       err_msg=f"clip {i}")


def test_encoding_files_fails_a_clip_an_integer_set_cannot_hold_rather_than_wrapping_it(dataset, extracted,
                                                                                        monkeypatch):
    """``frames/32`` is stored as uint8. An encoder giving 300 (or NaN) for a clip: extraction refuses
    that row, but encoding files (``heads classify``) cast it to 44 (or 0) and classified it from those
    values without a word."""
    from featurestore.encode_files import FileEncoder

    with open_store(extracted) as store:
        encoder = FileEncoder({"frames/32": store.feature_info("frames/32").provenance}, "cpu", batch_size=1,
                              num_workers=0)
    frames = encoder.targets[0].encoder
    forward = frames.forward
    bad = dataset.clips[2].clip_id

    def too_bright(batch: torch.Tensor) -> torch.Tensor:
        out = forward(batch).float()
        return out + 300 if too_bright.calls.pop(0) else out

    clips = [i for i in range(len(dataset.clips)) if i not in BROKEN][:4]
    too_bright.calls = [dataset.clips[i].clip_id == bad for i in clips]
    monkeypatch.setattr(frames, "forward", too_bright)
    result = encoder.encode([dataset.root / dataset.clips[i].video for i in clips])
    assert list(result.errors) == [bad]
    assert result.errors[bad].startswith("frames/32: non-finite or out-of-range output from frames/32: NaN, "
                                         "infinity or a value outside 0..255 cannot be stored as uint8")
    assert bad not in [c.name for c in result.ok_clips] and len(result.ok_clips) == 3


class _BrightensInPlace(FramePreprocessor):
    """A plugin's device preprocessing that brightens the shared uint8 frames in place."""

    def batched(self, frames: torch.Tensor) -> torch.Tensor:
        return super().batched(frames.add_(1))


class BrightensInPlace(VideoSignature):
    def __init__(self, spec: str = "brightens") -> None:
        super().__init__(spec)

    def preprocessor(self) -> FramePreprocessor:
        base = super().preprocessor()
        return _BrightensInPlace(base.crop, base.resize, base.interpolation, base.mean, base.std)


def test_a_device_preprocessing_step_that_changes_the_shared_frames_in_place_is_refused(dataset, tmp_path,
                                                                                         monkeypatch):
    """On an accelerator every image encoder of a source reads one device copy of the uint8 frames and
    runs its own ``batched`` step on it. Before: a step that wrote into them (``frames.add_``) made the
    encoders after it store features of the altered frames, silently."""
    from featurestore.testing import EncoderContractError

    monkeypatch.setattr(extract_workers, "PREPROCESS_ON_DEVICE", True)  # the device path, on the CPU
    with pytest.raises(EncoderContractError, match=r"brightens.*changed the decoded frames in place"):
        extract(dataset, tmp_path / "s.zarr", [BrightensInPlace(), VideoSignature()], device="cpu", batch_size=2,
                num_workers=0, chunk_clips=2, progress=False)
    with open_store(tmp_path / "s.zarr") as store:  # nothing the encoder after it stored is of altered frames
        done = store.done_mask("videosig")
        for i in np.flatnonzero(done):
            np.testing.assert_allclose(store.get("videosig", store.clip_ids[i]),
                                       reference(dataset, VideoSignature(), i), rtol=1e-6, atol=1e-6)
