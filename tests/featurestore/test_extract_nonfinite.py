"""An encoder that returns NaN (or a value that overflows the stored float16) for one clip, through a
real ``extract``: that clip is a per-clip error naming the encoder, never marked done; the finite
clips of its chunk are written and done as usual; the run exits 1 and lists it.

The encoder is a real plug-in, installed as a distribution with a ``featurestore.encoders`` entry
point (what ``pip install`` of a plug-in leaves) and built from its spec by the registry.
"""
from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from tests.featurestore.test_extract_support import FAST, clip_id, make_dataset

from featurestore import demo
from featurestore.encoders import _registry, refresh_plugins
from featurestore.errors import MissingFeatureError
from featurestore.extract import extract
from featurestore.store import open_store

PLUGIN = textwrap.dedent('''
    import torch
    from featurestore.encoders import AudioSegments, Encoder

    class QuietIsNaN(Encoder):
        """Mean, std, peak and std again per 1 s segment, except that a quiet segment (std < 0.01)
        gives NaN (or, with ``overflow=True``, 1e6: beyond float16, stored as infinity)."""
        modality = "audio"

        def __init__(self, spec, overflow=False):
            super().__init__(spec)
            self.overflow = bool(overflow)
            self.sample_rate = 16000
            self.segment_seconds = 1.0

        @property
        def output_shape(self):
            return (4,)

        def config(self):
            return {"overflow": self.overflow}

        def preprocessor(self):
            return AudioSegments(samples=16000, sample_rate=16000)

        def forward(self, batch):
            std = batch.std(dim=1)
            bad = torch.full_like(std, 1e6 if self.overflow else float("nan"))
            return torch.stack([batch.mean(dim=1), std, batch.abs().amax(dim=1),
                                torch.where(std < 0.01, bad, std)], dim=1)
''')
ENCODERS = "quietnan,logmel"
QUIET = 2  # the clip whose audio is quiet: its quietnan row is non-finite
N_CLIPS = 5
OPTIONS = {**FAST, "chunk_clips": 4}  # rows 0..3 share a chunk with the quiet clip


@pytest.fixture
def plugin(tmp_path, monkeypatch) -> Iterator[None]:
    """Install the plug-in as a distribution on sys.path; restore the registry afterwards."""
    root = tmp_path / "site"
    (root / "fs_quietnan").mkdir(parents=True)
    (root / "fs_quietnan" / "__init__.py").write_text(PLUGIN)
    dist = root / "fs_quietnan-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fs_quietnan\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[featurestore.encoders]\nquietnan = fs_quietnan:QuietIsNaN\n")
    saved = dict(_registry._REGISTRY)
    monkeypatch.syspath_prepend(str(root))
    refresh_plugins()
    yield
    _registry._REGISTRY.clear()
    _registry._REGISTRY.update(saved)
    sys.modules.pop("fs_quietnan", None)
    refresh_plugins()


def _dataset(root: Path):
    manifest = make_dataset(root, N_CLIPS)
    rng = np.random.default_rng(0)
    quiet = (1e-3 * rng.standard_normal((2 * 48000, 2))).astype(np.float32)  # not silent: decodes fine
    demo.write_wav(root / manifest.clips[QUIET].audio, quiet, 48000, subtype="PCM_16")
    return manifest


@pytest.mark.parametrize("overflow, found", [(False, "2 NaN and 0 infinite"), (True, "0 NaN and 2 infinite")])
def test_a_non_finite_row_is_a_per_clip_error_and_the_rest_of_its_chunk_is_done(plugin, tmp_path, overflow, found):
    manifest = _dataset(tmp_path / "data")
    store = tmp_path / "nan.zarr"
    options = {"quietnan": {"overflow": overflow}}
    summary = extract(manifest, store, ENCODERS, encoder_options=options, **OPTIONS)

    assert summary.exit_code == 1 and summary.clips_failed == 1
    message = summary.failures[clip_id(QUIET)]["quietnan"]
    assert message.startswith("non-finite output from quietnan: ") and found in message, message
    assert list(summary.failures[clip_id(QUIET)]) == ["quietnan"]  # logmel of that clip is fine
    assert any(clip_id(QUIET) in line and "non-finite output from quietnan" in line
               for line in summary.failure_lines())
    with open_store(store) as fs:
        assert fs.verify().ok
        expected = np.arange(N_CLIPS) != QUIET
        np.testing.assert_array_equal(fs.done_mask("quietnan"), expected)
        assert fs.done_mask("logmel").all()
        assert fs.errors("quietnan") == {clip_id(QUIET): message}
        values = fs.get_many("quietnan", [c for i, c in enumerate(fs.clip_ids) if i != QUIET])
        assert np.isfinite(values).all() and (values[:, :, 1] > 0.01).all()
        with pytest.raises(MissingFeatureError):  # never served
            fs.get("quietnan", clip_id(QUIET))

    again = extract(manifest, store, ENCODERS, encoder_options=options, **OPTIONS)  # retried, fails again
    assert again.exit_code == 1 and again.clips_skipped == N_CLIPS - 1
    assert again.features["quietnan"].written == 0
    with open_store(store) as fs:
        assert not fs.done_mask("quietnan")[QUIET] and fs.verify().ok



def test_the_device_side_check_finds_the_same_rows_as_numpys():
    """On an accelerator the rows are judged there (torch); on the CPU by numpy: the same verdicts."""
    import torch

    from featurestore.extract.pipeline import finite_rows

    out = np.ones((5 * 2, 3), dtype=np.float16)  # 5 rows of 2 segments
    out[2, 1] = np.nan
    out[5, 0] = np.inf  # what a float16 overflow gives
    out[9, 2] = -np.inf
    expected = [True, False, False, True, False]
    np.testing.assert_array_equal(finite_rows(out, 5), expected)
    np.testing.assert_array_equal(finite_rows(torch.from_numpy(out), 5), expected)
