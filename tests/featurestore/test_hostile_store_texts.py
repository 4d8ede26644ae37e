"""Text that is not UTF-8: Python decodes a file or folder name in another encoding with lone
surrogates ('caf\\udce9'). An error message naming such a file is stored with the surrogate as its
escape (the write of the block failed with a bare UnicodeEncodeError, its rows never marked done);
a media path that cannot be stored is refused before the append writes anything."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from featurestore import ClipRecord, Manifest, create_store
from featurestore.store import open_store

PROVENANCE = {"encoder": "test/hostile", "config": {}, "weights": {"kind": "random", "seed": 0},
              "segments": {"frames": 1}}
NOT_UTF8 = "/data/caf\udce9/clip.wav"


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_an_error_naming_a_file_that_is_not_utf8_is_stored_escaped(tmp_path, suffix):
    path = tmp_path / f"s{suffix}"
    with create_store(path, Manifest("texts", ["a"], [ClipRecord(f"k{i}", label="a") for i in range(4)])) as store:
        store.create_feature_set("e", 1, (2,), PROVENANCE)
        store.write_rows("e", 0, np.ones((4, 1, 2)), done=[True, True, False, True], errors={2: f"cannot decode {NOT_UTF8}"})
        store.set_errors("e", {"k0": f"cannot read {NOT_UTF8}"})
    with open_store(path) as store:
        assert store.errors("e") == {"k0": "cannot read /data/caf\\udce9/clip.wav",
                                     "k2": "cannot decode /data/caf\\udce9/clip.wav"}
        assert store.done_mask("e").tolist() == [False, True, False, True]


def test_a_media_path_that_is_not_utf8_is_refused_before_the_append_writes(tmp_path):
    path = tmp_path / "s.zarr"
    with create_store(path, Manifest("texts", ["a"], [ClipRecord("k0", label="a")])) as store:
        bad = Manifest("texts", ["a"], [ClipRecord("k1", label="a"), ClipRecord("k2", label="a", video=Path(NOT_UTF8))])
        with pytest.raises(ValueError, match=r"clip 'k2': its video_path .* is not valid UTF-8"):
            store.append_clips(bad)
        assert store.n_clips == 1
        assert store.arrays.shape("index/clip_id") == (1,)
