"""Rows given to ``write_rows`` that numpy would convert to the stored numbers by losing what
they are (an imaginary part, text, floats truncated into an integer set, integers wrapped) are
refused in one line naming the array, and nothing is written; rows in any memory layout or byte
order are stored as their values."""
from __future__ import annotations

import numpy as np
import pytest

from featurestore import TAU_CLASSES, ClipRecord, Manifest, create_store

PROVENANCE = {"encoder": "test/hostile", "config": {}, "weights": {"kind": "random", "seed": 0},
              "segments": {"frames": 1}}
N = 40


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    ids = [f"{TAU_CLASSES[i % 10]}-city0-{i}-a" for i in range(N)]
    manifest = Manifest("hostile", list(TAU_CLASSES),
                        [ClipRecord(c, label=TAU_CLASSES[i % 10]) for i, c in enumerate(ids)])
    with create_store(tmp_path_factory.mktemp("writes") / "s.zarr", manifest) as store:
        store.create_feature_set("f", 2, (3,), PROVENANCE, chunk_clips=20)
        store.create_feature_set("u", 1, (4,), PROVENANCE, dtype="uint8", chunk_clips=20)
        yield store


BAD = {
    "complex": ("f", np.ones((20, 2, 3), dtype=complex), "complex128"),
    "text": ("f", np.full((20, 2, 3), "1"), "<U1"),
    "objects": ("f", np.ones((20, 2, 3), dtype=object), "object"),
    "floats into uint8": ("u", np.full((20, 1, 4), 1.5), "float64"),
    "integers out of range": ("u", np.full((20, 1, 4), 256), r"0\.\.255"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_rows_that_would_lose_their_values_are_refused_and_nothing_is_written(store, case):
    name, rows, named = BAD[case]
    before = store.done_mask(name, refresh=True).copy()
    with pytest.raises(ValueError, match=rf"features/{name}/data: rows .*{named}"):
        store.write_rows(name, 0, rows)
    np.testing.assert_array_equal(store.done_mask(name, refresh=True), before)


def test_rows_in_any_layout_and_byte_order_are_stored_as_their_values(store):
    values = np.random.default_rng(0).standard_normal((N, 2, 3))
    wide = np.zeros((20, 2, 6))
    wide[:, :, ::2] = values[20:]
    store.write_rows("f", 0, np.asfortranarray(values[:20]).astype(">f4"))
    store.write_rows("f", 20, wide[:, :, ::2])  # a strided view
    store.write_rows("u", 0, np.arange(N * 4).reshape(N, 1, 4))  # int64 within uint8's range
    store.refresh()
    np.testing.assert_array_equal(store.get_many("f", store.clip_ids), values.astype(np.float16))
    np.testing.assert_array_equal(store.get("u", store.clip_ids[39]), [[156, 157, 158, 159]])


@pytest.mark.parametrize("n_segments, feature_shape", [(1, (0,)), (0, (4,)), (1, (3, 0)), (-1, (4,))])
def test_a_set_with_an_empty_or_negative_axis_is_refused_in_one_line(store, n_segments, feature_shape):
    with pytest.raises(ValueError, match=r"features/empty/data: shape .* has an empty or negative axis"):
        store.create_feature_set("empty", n_segments, feature_shape, PROVENANCE)


@pytest.mark.parametrize("key", ["k3", 3.7, True])
def test_errors_keyed_by_anything_but_a_row_number_are_refused_in_one_line(store, key):
    with pytest.raises(ValueError, match=r"features/f: errors are keyed by row number, got"):
        store.write_rows("f", 0, np.ones((20, 2, 3)), done=np.arange(20) != 3, errors={key: "boom"})


@pytest.mark.parametrize("start", [20.0, np.float32(20), "20", True, None])
def test_a_start_that_is_not_a_row_number_is_refused_in_one_line(store, start):
    with pytest.raises(TypeError, match=r"features/f: start is a row number, got the"):
        store.write_rows("f", start, np.ones((20, 2, 3)))
