"""featurestore.extract on tiny real datasets: values, provenance, resume, bad input, fingerprints."""
from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import zarr
from tests.featurestore.test_extract_support import ENCODERS, FAST, assert_same_arrays, clip_id, make_dataset, read_all, write_wav

import featurestore.extract.workers as extract_decode
from featurestore.decode import load_audio_segments, sample_frames
from featurestore.encoders import create_encoder, resolve_device
from featurestore.errors import FingerprintMismatchError
from featurestore.extract import extract
from featurestore.store import create_store, open_store


#: A small CLIP text tower (width 256, 10 layers; ViT-B-32's is 512 and 12 layers): built with random
#: weights by each run that writes class prompt embeddings, ~1 s of CPU less per build.
TEXT = "cliptext/ViT-S-32-alt"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Five 2 s clips (2 audio segments, 2 frames each)."""
    return make_dataset(tmp_path_factory.mktemp("tiny"), 5)


@pytest.fixture(scope="module")
def tiny_store(tiny, tmp_path_factory):
    """One uninterrupted extraction of ``tiny`` (chunks of 2 clips) and its summary."""
    path = tmp_path_factory.mktemp("stores") / "tiny.zarr"
    summary = extract(tiny, path, ENCODERS, **{**FAST, "device": "auto"})
    return path, summary


def test_every_clip_is_written_with_the_values_of_a_direct_encoding(tiny, tiny_store):
    path, summary = tiny_store
    assert (summary.clips_done, summary.clips_skipped, summary.clips_failed) == (5, 0, 0)
    assert summary.exit_code == 0 and summary.device == str(resolve_device("auto"))
    with open_store(path) as store:
        assert store.verify().ok
        cid = clip_id(3)
        audio = load_audio_segments(tiny.root / tiny.clips[3].audio, 48000, 2, 1.0)
        logmel = create_encoder("logmel")
        expected = logmel.encode(logmel.preprocessor()(audio)).numpy()
        got = store.get("logmel", cid).astype(np.float32)
        assert got.shape == (2, 256, 94)
        np.testing.assert_allclose(got, expected, rtol=2e-3, atol=0.05)
        vit = create_encoder("timm/test_vit@none")
        frames = sample_frames(tiny.root / tiny.clips[3].video, 2)
        expected = vit.encode(vit.preprocessor()(frames)).numpy()
        np.testing.assert_allclose(store.get("timm/test_vit", cid).astype(np.float32), expected,
                                   rtol=1e-2, atol=2e-3)


def test_provenance_records_encoder_segment_scheme_and_runtime(tiny_store):
    path, summary = tiny_store
    with open_store(path) as store:
        sets = store.feature_sets()
    audio, video = sets["logmel"].provenance, sets["timm/test_vit"].provenance
    assert audio["segments"] == {"kind": "audio", "n_segments": 2, "segment_seconds": 1.0, "sample_rate": 48000}
    assert video["segments"] == {"kind": "frames", "n_frames": 2}
    assert audio["runtime"]["device"] == summary.device and "versions" in audio["runtime"]
    assert video["encoder"] == "timm/test_vit@none" and sets["timm/test_vit"].random_weights
    assert summary.random_weights == ["timm/test_vit"] and "RANDOM weights: timm/test_vit" in summary.line()


def test_summary_reports_time_per_stage_and_encoder(tiny_store):
    _, summary = tiny_store
    stages = summary.stage_seconds
    for stage in ("decode audio", "decode frames", "preprocess", "encode logmel", "encode timm/test_vit", "write"):
        assert stages[stage] > 0, stage
    line = summary.line()
    assert line.startswith("extract: 5 clips done, 0 skipped, 0 failed of 5")
    assert "logmel" in line and "timm/test_vit" in line and "write" in line
    assert summary.features["logmel"].written == 5


def test_rerun_skips_done_clips_and_leaves_the_arrays_unchanged(tiny, tiny_store, tmp_path):
    path, _ = tiny_store
    copy = tmp_path / "copy.zarr"
    shutil.copytree(path, copy)
    before = read_all(copy)
    summary = extract(tiny, copy, ENCODERS, **FAST)
    assert (summary.clips_done, summary.clips_skipped, summary.clips_failed) == (0, 5, 0)
    assert summary.features["logmel"].written == 0 and summary.features["logmel"].skipped == 5
    assert_same_arrays(read_all(copy), before)


def test_one_decode_per_clip_feeds_every_encoder_of_the_modality(tiny, tmp_path, monkeypatch):
    calls = []

    def counting(path, n_frames):
        calls.append(str(path))
        return sample_frames(path, n_frames)

    monkeypatch.setattr(extract_decode, "sample_frames", counting)
    summary = extract(tiny, tmp_path / "s.zarr", "timm/test_vit@none,timm/test_resnet@none",
                      **{**FAST, "num_workers": 0})
    assert summary.clips_done == 5
    assert sorted(calls) == sorted(str(tiny.root / c.video) for c in tiny.clips)


def test_bad_clips_are_recorded_and_the_rest_of_their_block_is_written(tiny, tiny_store, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny.root, root)
    manifest = type(tiny)(**{**tiny.__dict__, "root": root})
    wav = root / tiny.clips[1].audio
    wav.write_bytes(wav.read_bytes()[: wav.stat().st_size // 2])  # truncated WAV
    (root / tiny.clips[2].video).write_bytes(b"not a video at all" * 100)  # garbage MP4
    path = tmp_path / "bad.zarr"
    summary = extract(manifest, path, ENCODERS, **{**FAST, "chunk_clips": 4})  # both failures inside block 0:4
    assert summary.exit_code == 1 and summary.clips_failed == 2 and summary.clips_done == 3
    assert set(summary.failures) == {clip_id(1), clip_id(2)}
    assert "truncated" in summary.failures[clip_id(1)]["logmel"]
    assert list(summary.failures[clip_id(2)]) == ["timm/test_vit"]
    with open_store(path) as store:
        assert store.verify().ok
        np.testing.assert_array_equal(store.done_mask("logmel"), [True, False, True, True, True])
        np.testing.assert_array_equal(store.done_mask("timm/test_vit"), [True, True, False, True, True])
        assert list(store.errors("logmel")) == [clip_id(1)] and list(store.errors("timm/test_vit")) == [clip_id(2)]
    reference = read_all(tiny_store[0])
    first = read_all(path)
    for name in ("logmel", "timm/test_vit"):  # rows that succeeded equal the clean run's (same batches)
        ok = first[name][1]
        np.testing.assert_array_equal(first[name][0][ok].view(np.uint16), reference[name][0][ok].view(np.uint16))

    write_wav(wav, 2.0, seed=1)  # repair the audio: the rerun retries exactly the failed rows
    shutil.copy(tiny.root / tiny.clips[2].video, root / tiny.clips[2].video)
    again = extract(manifest, path, ENCODERS, **{**FAST, "chunk_clips": 4})
    assert again.exit_code == 0 and again.clips_done == 2 and again.clips_skipped == 3
    assert again.features["logmel"].written == 1 and again.features["timm/test_vit"].written == 1
    after = read_all(path)
    with open_store(path) as store:
        assert store.verify().ok and not store.errors("logmel") and not store.errors("timm/test_vit")
    for name in ("logmel", "timm/test_vit"):
        ok = first[name][1]
        np.testing.assert_array_equal(after[name][0][ok].view(np.uint16), first[name][0][ok].view(np.uint16))
        assert after[name][1].all()
        np.testing.assert_allclose(after[name][0].astype(np.float32), reference[name][0].astype(np.float32),
                                   rtol=1e-2, atol=0.05)


def test_a_different_encoder_config_is_refused_unless_overwrite(tiny, tiny_store, tmp_path):
    path = tmp_path / "fp.zarr"
    shutil.copytree(tiny_store[0], path)
    with pytest.raises(FingerprintMismatchError) as err:
        extract(tiny, path, "timm/test_vit@none", frames=3, **FAST)
    message = str(err.value)
    assert "timm/test_vit" in message and "n_frames: existing 2, requested 3" in message and "\n" not in message
    with open_store(path) as store:
        assert store.feature_sets()["timm/test_vit"].shape == (5, 2, 64)  # untouched
    summary = extract(tiny, path, "timm/test_vit@none", frames=3, overwrite=True, **FAST)
    assert summary.clips_done == 5
    with open_store(path) as store:
        info = store.feature_sets()["timm/test_vit"]
        assert info.shape == (5, 3, 64) and info.n_done == 5
        assert store.feature_sets()["logmel"].n_done == 5  # other feature sets are left alone


def test_a_feature_set_left_half_created_by_a_kill_is_replaced(tiny, tiny_store, tmp_path):
    path = tmp_path / "half.zarr"
    with create_store(path, tiny) as store:  # a kill inside create_feature_set: arrays, no attributes
        store.create_feature_set("logmel", 2, (256, 94), {"encoder": "stale"}, chunk_clips=4)
    zarr.open_group(str(path), mode="r+")["features/logmel"].attrs.clear()
    with open_store(path) as store:
        assert store.feature_sets()["logmel"].fingerprint == ""
    summary = extract(tiny, path, "logmel", **FAST)
    assert summary.clips_done == 5
    with open_store(path) as store:
        info = store.feature_sets()["logmel"]
        assert info.fingerprint and info.chunk_clips == 2 and info.n_done == 5
    assert_same_arrays({"logmel": read_all(path)["logmel"]}, {"logmel": read_all(tiny_store[0])["logmel"]})


def test_limit_extracts_the_first_clips_and_a_full_rerun_completes(tiny, tmp_path):
    path = tmp_path / "limit.zarr"
    summary = extract(tiny, path, "logmel", limit=3, **FAST)
    assert (summary.clips_selected, summary.clips_done) == (3, 3)
    with open_store(path) as store:
        assert store.n_clips == 5  # the index holds the whole dataset
        np.testing.assert_array_equal(store.done_mask("logmel"), [True, True, True, False, False])
        assert store.verify().ok and not store.errors("logmel")
        row2 = store.get("logmel", clip_id(2))
    rest = extract(tiny, path, "logmel", **FAST)
    assert (rest.clips_done, rest.clips_skipped) == (2, 3)
    with open_store(path) as store:
        assert store.done_mask("logmel").all()
        np.testing.assert_array_equal(store.get("logmel", clip_id(2)).view(np.uint16), row2.view(np.uint16))


def test_missing_files_are_all_reported_before_any_work(tiny, tmp_path):
    from featurestore.datasets import MissingFilesError

    root = tmp_path / "data"
    shutil.copytree(tiny.root, root)
    (root / tiny.clips[0].audio).unlink()
    (root / tiny.clips[4].video).unlink()
    manifest = type(tiny)(**{**tiny.__dict__, "root": root})
    with pytest.raises(MissingFilesError) as err:
        extract(manifest, tmp_path / "never.zarr", "logmel", **FAST)
    assert clip_id(0) in str(err.value) and clip_id(4) in str(err.value)
    assert not (tmp_path / "never.zarr").exists()


def test_text_encoders_write_class_prompt_embeddings_once(tiny, tmp_path):
    path = tmp_path / "text.zarr"
    summary = extract(tiny, path, f"logmel,{TEXT}@none", **FAST)
    assert summary.class_features == {TEXT: "written"}
    with open_store(path) as store:
        data, attrs = store.get_class_features(TEXT)
        assert data.shape == (10, 256) and np.isfinite(data).all()
        assert len(attrs["prompts"]) == 10 and "airport" in attrs["prompts"][0]
        assert attrs["provenance"]["weights"]["kind"] == "random"
    again = extract(tiny, path, f"logmel,{TEXT}@none", **FAST)
    assert again.class_features == {TEXT: "unchanged"} and again.clips_skipped == 5
    with open_store(path, "a") as store:  # someone stored the same name with other weights
        store.write_class_features(TEXT, np.zeros((10, 256), np.float32),
                                   {**attrs["provenance"], "weights": {"kind": "file", "sha256": "ab"}},
                                   overwrite=True)
    with pytest.raises(FingerprintMismatchError, match=r"weights\.kind: existing \"file\", requested \"random\""):
        extract(tiny, path, f"logmel,{TEXT}@none", **FAST)
    with open_store(path) as store:
        assert not store.get_class_features(TEXT)[0].any()  # refused: nothing replaced
    assert extract(tiny, path, f"logmel,{TEXT}@none", **FAST, overwrite=True).class_features == {
        TEXT: "written"}
    with open_store(path) as store:
        np.testing.assert_array_equal(store.get_class_features(TEXT)[0], data)


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(num_workers=-1), dict(frames=0), dict(limit=0)])
def test_bad_arguments_are_refused_by_name(tiny, tmp_path, bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        extract(tiny, tmp_path / "x.zarr", "logmel", **{**FAST, **bad})


def test_more_clips_join_an_existing_store_at_a_file_url(tiny, tmp_path):
    """Clips added by a later run (e.g. a second batch of recordings) are indexed and extracted;
    the first clips are skipped. Through a ``file://`` URL: the fsspec path object stores take."""
    url = f"file://{tmp_path}/nested/grow.zarr"  # parents missing: fsspec must create them
    first = extract(tiny.subset(tiny.clip_ids[:3]), url, "logmel", **FAST)
    assert first.exit_code == 0 and first.clips_done == 3
    again = extract(tiny, url, "logmel", **FAST)
    assert again.exit_code == 0 and (again.clips_done, again.clips_skipped) == (2, 3)
    with open_store(url) as store:
        assert store.clip_ids == tiny.clip_ids and store.verify().ok
        assert store.feature_info("logmel").n_done == 5
    assert_same_arrays(read_all(url), read_all(_extracted(tiny, tmp_path / "local.zarr")))


def test_a_refused_run_leaves_the_store_as_it_was(tiny, tmp_path):
    """Clips of another segment layout cannot join a feature set: the run is refused before the
    index grows, the store's attributes change, or any text embedding is written."""
    path = tmp_path / "keep.zarr"
    extract(tiny.subset(tiny.clip_ids[:3]), path, "logmel", **FAST)
    with open_store(path) as store:
        attrs_before, data_before = store.attrs, store.get_many("logmel", store.clip_ids)
    with pytest.raises(FingerprintMismatchError, match="n_segments: existing 2, requested 1"):
        extract(tiny, path, f"{TEXT}@none,logmel", **FAST, segments=1)
    with open_store(path) as store:
        assert store.n_clips == 3 and store.attrs == attrs_before and store.class_feature_sets() == []
        np.testing.assert_array_equal(store.get_many("logmel", store.clip_ids), data_before)

    renamed = replace(tiny, name="second-batch")  # the same layout from another manifest joins
    assert extract(renamed, path, "logmel", **FAST).clips_done == 2
    with open_store(path) as store:
        assert store.attrs["dataset"] == tiny.name  # the store still describes its first dataset
        assert [(d["dataset"], d["rows"]) for d in store.attrs["datasets"]] == [(tiny.name, [0, 3]),
                                                                                ("second-batch", [3, 5])]


def test_a_frame_encoder_on_an_audio_only_dataset_is_refused_before_any_work(tiny, tmp_path):
    audio_only = replace(tiny, clips=[replace(c, video=None) for c in tiny.clips])
    with pytest.raises(ValueError, match="timm/test_vit@none needs video files, but dataset 'tiny'"):
        extract(audio_only, tmp_path / "never.zarr", "logmel,timm/test_vit@none", **FAST)
    assert not (tmp_path / "never.zarr").exists()
    assert extract(audio_only, tmp_path / "audio.zarr", "logmel", **FAST).clips_done == 5


def _extracted(manifest, path):
    extract(manifest, path, "logmel", **FAST)
    return path


def test_the_same_feature_set_twice_is_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match="requested twice"):
        extract(tiny, tmp_path / "x.zarr", "timm/test_vit@none,timm/test_vit@none:1", **FAST)


def test_extraction_into_hdf5_gives_the_same_arrays(tiny, tiny_store, tmp_path):
    path = tmp_path / "tiny.h5"
    summary = extract(tiny, path, ENCODERS, **FAST)
    assert summary.clips_done == 5
    assert_same_arrays(read_all(path), read_all(tiny_store[0]))


def test_encoder_outputs_on_cpu_do_not_depend_on_torch_threads(tiny, tiny_store, tmp_path):
    """Dask workers run with one thread; the arrays must still equal a two-thread run bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        extract(tiny, tmp_path / "one.zarr", ENCODERS, **FAST)
    finally:
        torch.set_num_threads(threads)
    assert_same_arrays(read_all(tmp_path / "one.zarr"), read_all(tiny_store[0]))


def test_encoders_with_equal_preprocessors_share_one_tensor_per_clip(tiny):
    from featurestore.extract.workers import ClipDecoder, Job, collate
    from featurestore.extract.plan import Source
    from featurestore.encoders import FramePreprocessor

    def frames_job(index: int, name: str, crop: int) -> Job:
        pre = FramePreprocessor(crop=(crop, crop), resize=crop, interpolation="bicubic", mean=(0.5,) * 3,
                                std=(0.25,) * 3)
        return Job(index, name, "frames@2", pre, 2)

    jobs = [frames_job(0, "a", 32), frames_job(1, "b", 32), frames_job(2, "c", 40)]
    paths = [str(tiny.root / c.video) for c in tiny.clips]
    decoder = ClipDecoder({"frames@2": Source("frames", 2)}, jobs, {0: (0, 1, 2), 1: (0, 1, 2)}, [""] * 5, paths)
    first = decoder[0]
    assert first.inputs[0] is first.inputs[1] and first.inputs[2].shape == (2, 3, 40, 40)
    batch = collate([first, decoder[1]])
    assert batch.inputs[0][1] is batch.inputs[1][1] and batch.inputs[0][1].shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(batch.inputs[0][0], [0, 1])
    assert batch.seconds["decode frames"] > 0 and not batch.errors
