"""`featurestore.checks.is_int_in`: the one integer-range check counts, sizes and limits go through."""
from __future__ import annotations

import numpy as np
import pytest

from featurestore.checks import is_int_in
from featurestore.manifest import MAX_VIDEO_FRAMES, Manifest


@pytest.mark.parametrize("value, low, high, expected", [
    (1, 1, 3, True), (3, 1, 3, True), (0, 1, 3, False), (4, 1, 3, False),
    (10**9, 1, None, True), (np.int64(2), 1, 3, True), (np.uint8(0), 1, 3, False),
    (True, 0, 3, False), (False, 0, 3, False),  # a bool is an int in Python, never a count
    (2.0, 1, 3, False), ("2", 1, 3, False), (None, 1, 3, False), (float("nan"), 1, 3, False),
])
def test_is_int_in(value, low, high, expected):
    assert is_int_in(value, low, high) is expected


def test_whole_floats_only_where_asked():
    assert is_int_in(12.0, 1, 20, whole_floats=True)
    assert not is_int_in(12.5, 1, 20, whole_floats=True)
    assert not is_int_in(float("inf"), 1, None, whole_floats=True)
    assert not is_int_in(12.0, 1, 20)


def test_manifest_refuses_a_bool_frame_count_through_it():
    with pytest.raises(ValueError, match=r"video_frames must be an integer with 1 <= video_frames <= "):
        Manifest(name="d", classes=["a"], clips=[], video_frames=True)
    with pytest.raises(ValueError, match=str(MAX_VIDEO_FRAMES)):
        Manifest(name="d", classes=["a"], clips=[], video_frames=MAX_VIDEO_FRAMES + 1)


def test_non_finite_rows_on_arrays_and_tensors():
    import torch

    from featurestore.checks import non_finite_rows

    x = np.zeros((4, 2, 3), np.float16)
    x[1, 0, 2], x[3, 1, 1] = np.nan, -np.inf
    expected = [False, True, False, True]
    assert non_finite_rows(x).tolist() == expected
    assert non_finite_rows(torch.from_numpy(x)).tolist() == expected
    assert non_finite_rows(np.full((3, 5), 7, np.int64)).tolist() == [False] * 3
    assert non_finite_rows(torch.zeros(2, 3, dtype=torch.uint8)).tolist() == [False, False]
    assert non_finite_rows(np.zeros((0, 4))).shape == (0,)
    big = np.full((2, 3), np.finfo(np.float16).max, np.float16)  # finite, though a float16 sum would overflow
    assert non_finite_rows(big).tolist() == [False, False]


def test_extract_refuses_a_bool_batch_size_before_reading_anything(tmp_path):
    from featurestore.extract import extract

    with pytest.raises(ValueError, match=r"^batch_size must be an integer >= 1, got True$"):
        extract(tmp_path / "no-dataset", tmp_path / "s.zarr", ["logmel"], batch_size=True)
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("split", ["a/b", "..", "", "x y", 3])
def test_a_split_name_that_cannot_be_a_store_key_is_refused_in_one_line(tmp_path, split):
    """A '/' in a split name made zarr fail deep inside store creation (`index/split/<name>` is an array)."""
    from featurestore import ClipRecord, create_store

    clips = [ClipRecord("c0", label="a", splits=frozenset({split}))]
    with pytest.raises(ValueError, match=r"^dataset 'd': split name .* cannot be a store key; split names follow"):
        create_store(tmp_path / "s.zarr", Manifest(name="d", classes=["a"], clips=clips))
    assert not (tmp_path / "s.zarr").exists()
