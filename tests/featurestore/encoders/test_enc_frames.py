"""The ``frames/<size>`` feature set: spec grammar, the resize, and the store's whole life cycle for it
(extraction, resume, get/get_many, verify, HDF5 conversion), on tiny clips and frames. Its Dask run is in
test_extract_dask.py, on that module's cluster."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from tests.featurestore.test_extract_support import clip_id, make_dataset

from featurestore.decode import sample_frames
from featurestore.encoders import FrameResize, SpecError, create_encoder
from featurestore.extract import extract
from featurestore.store import open_store
from featurestore.store.convert import convert_store

OPTIONS = dict(device="cpu", batch_size=2, num_workers=1, chunk_clips=2, progress=False)


@pytest.mark.parametrize("spec, size", [("frames", 448), ("frames/64", 64), ("frames/224x224", 224)])
def test_spec_gives_the_size_and_a_canonical_name(spec, size):
    enc = create_encoder(spec)
    assert enc.name == enc.spec == f"frames/{size}"
    assert enc.output_shape == (3, size, size) and enc.dtype == "uint8" and enc.modality == "video"
    assert enc.provenance()["weights"] == {"kind": "parameter-free"}


@pytest.mark.parametrize("spec", ["frames@none", "frames/big", "frames/448x224", "frames/4"])
def test_bad_specs_are_refused_with_the_expected_form(spec):
    with pytest.raises(SpecError, match="frames"):
        create_encoder(spec)


def test_whole_frame_is_squashed_to_a_square_like_pil_bilinear():
    rng = np.random.default_rng(0)
    # a smooth 90x160 (16:9) frame: the whole frame, squashed, with no crop
    y, x = np.mgrid[0:90, 0:160]
    frame = np.stack([x * 1.5, y * 2.5, (x + y) * 0.9], axis=-1).clip(0, 255).astype(np.uint8)
    frame = (frame.astype(int) + rng.integers(-3, 4, frame.shape)).clip(0, 255).astype(np.uint8)
    out = FrameResize(48)(frame[None])
    assert out.shape == (1, 3, 48, 48) and out.dtype.is_floating_point is False
    expected = np.asarray(Image.fromarray(frame).resize((48, 48), Image.BILINEAR))
    diff = np.abs(out[0].permute(1, 2, 0).numpy().astype(int) - expected.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.5
    # corners come from the frame's corners: nothing was cropped
    assert abs(int(out[0, 0, 0, -1]) - int(frame[0, -1, 0])) <= 4


def test_preprocessor_rejects_non_uint8_frames():
    with pytest.raises(ValueError, match="uint8 RGB frames"):
        FrameResize(32)(np.zeros((2, 8, 8, 3), np.float32))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Five 2 s clips with 2 frames each (48x64 MPEG-4)."""
    return make_dataset(tmp_path_factory.mktemp("frames_data"), 5)


def test_extraction_stores_the_resized_frames_and_resumes(clips, tmp_path):
    path = tmp_path / "s.zarr"
    summary = extract(clips, path, "frames/32", limit=3, **OPTIONS)
    assert (summary.clips_done, summary.exit_code) == (3, 0)
    again = extract(clips, path, "frames/32", **OPTIONS)  # resume: only the two missing clips
    assert (again.clips_done, again.clips_skipped) == (2, 3)
    with open_store(path) as store:
        info = store.feature_sets()["frames/32"]
        assert info.shape == (5, 2, 3, 32, 32) and str(info.dtype) == "uint8" and info.n_done == 5
        assert not info.random_weights
        expected = FrameResize(32)(sample_frames(clips.root / clips.clips[3].video, 2)).numpy()
        np.testing.assert_array_equal(store.get("frames/32", clip_id(3)), expected)
        many = store.get_many("frames/32", [clip_id(4), clip_id(0)])
        assert many.shape == (2, 2, 3, 32, 32) and many.dtype == np.uint8
        np.testing.assert_array_equal(many[1], store.get("frames/32", clip_id(0)))
        assert store.verify().ok
        assert store._b.compressor("features/frames/32/data") == "zstd"  # lossless, checksum kept
    h5 = tmp_path / "s.h5"
    convert_store(path, h5, progress=False)
    with open_store(h5) as converted:
        assert converted.verify().ok
        np.testing.assert_array_equal(converted.get("frames/32", clip_id(3)), expected)
