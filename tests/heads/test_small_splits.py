"""Small datasets train without knowing the options: a head's default batch larger than the split is cut
to the split (said on stderr); a batch the user asked for is never changed (an error naming --batch-size)."""
from __future__ import annotations

import pytest

from heads.cli import main
from tests.heads._store import build_store

#: 16 clips: 12 in "train", 4 in "val"; training on "val" gives 4 x 4 segments = 16 samples, fewer than
#: the linear head's default batch of 48
N = 16


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("small") / "small.zarr", n_clips=N)


def _train(store, out, *extra):
    return main(["train", "--store", str(store), "--head", "linear", "--features", "clip/ViT-B-32",
                 "--train-split", "val", "--val-split", "train", "--epochs", "1", "--out", str(out), "-q", *extra])


def test_a_default_batch_larger_than_the_split_is_cut_to_it_and_said(small_store, tmp_path, capsys):
    assert _train(small_store, tmp_path / "run") == 0
    err = capsys.readouterr().err
    assert "fewer than the head's default batch of 48: training with batches of 16" in err
    assert (tmp_path / "run" / "best.safetensors").is_file()


def test_a_batch_the_user_asked_for_is_never_cut_and_the_error_names_the_option(small_store, tmp_path, capsys):
    assert _train(small_store, tmp_path / "run", "--batch-size", "64") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "fewer than one batch of 64 (--batch-size): pass --batch-size 16 or less" in err
    assert not (tmp_path / "run" / "best.safetensors").exists()
