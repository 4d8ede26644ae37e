"""lhotse cuts name the fingerprint of the features they reference: a feature set extracted again with
another configuration after the cuts were saved is refused when a cut loads it (before: the new
features were read as the ones the cuts describe, silently)."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile

from featurestore import TAU_CLASSES, ClipRecord, Manifest, create_store, open_store


def test_cuts_refuse_features_extracted_again_with_another_configuration(tmp_path):
    lhotse = pytest.importorskip("lhotse")
    (tmp_path / "audio").mkdir()
    soundfile.write(tmp_path / "audio" / "c0.wav", np.zeros(800) + 0.1, 8000)
    clips = [ClipRecord("c0", label=TAU_CLASSES[0], audio=tmp_path / "audio" / "c0.wav", splits=frozenset({"train"}))]
    manifest = Manifest("toy", list(TAU_CLASSES), clips, root=tmp_path, audio_segments=1, segment_seconds=1.0)
    path = tmp_path / "s.zarr"
    with create_store(path, manifest) as store:
        store.create_feature_set("emb", 1, (3,), {"encoder": "x", "config": {"n": 1}}, dtype="float32")
        store.write_rows("emb", 0, np.ones((1, 1, 3), dtype=np.float32))
    with open_store(path) as store:
        store.to_lhotse(features=["emb"]).to_file(tmp_path / "cuts.jsonl")
    assert lhotse.CutSet.from_file(tmp_path / "cuts.jsonl")[0].load_custom("emb").tolist() == [[1.0, 1.0, 1.0]]
    with open_store(path, "a") as store:
        store.create_feature_set("emb", 1, (3,), {"encoder": "x", "config": {"n": 2}}, dtype="float32", overwrite=True)
        store.write_rows("emb", 0, np.full((1, 1, 3), 5, dtype=np.float32))
    with pytest.raises(ValueError, match="feature set 'emb' has fingerprint .* but the cut of clip 'c0' was made from"):
        lhotse.CutSet.from_file(tmp_path / "cuts.jsonl")[0].load_custom("emb")
