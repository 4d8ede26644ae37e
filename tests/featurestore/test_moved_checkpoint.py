"""A checkpoint is identified by its content: moving the file does not stop a resume, other content does."""
from __future__ import annotations

import shutil

import pytest
import timm
import torch
from safetensors.torch import save_file
from tests.featurestore.test_extract_support import FAST, make_dataset

from featurestore.errors import FingerprintMismatchError
from featurestore.extract import extract
from featurestore.store import open_store


def _checkpoint(path, seed: int):
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_moved_checkpoint_resumes_and_other_content_is_refused(tmp_path) -> None:
    dataset = make_dataset(tmp_path / "data", 2, seconds=1.0, frames=1)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = _checkpoint(tmp_path / "a" / "ckpt.safetensors", seed=1)
    store = tmp_path / "s.zarr"
    summary = extract(dataset, store, f"timm/test_resnet@{first}", **FAST, limit=1)
    assert summary.clips_done == 1
    moved = shutil.copy(first, tmp_path / "b" / "ckpt.safetensors")
    first.unlink()
    summary = extract(dataset, store, f"timm/test_resnet@{moved}", **FAST)
    assert (summary.clips_done, summary.clips_skipped) == (1, 1)
    with open_store(store) as opened:
        info = opened.feature_sets()["timm/test_resnet"]
        assert info.n_done == 2 and str(first) in info.provenance["weights"]["path"]  # the path stays, as information
    other = _checkpoint(tmp_path / "b" / "other.safetensors", seed=2)
    with pytest.raises(FingerprintMismatchError):
        extract(dataset, store, f"timm/test_resnet@{other}", **FAST)
