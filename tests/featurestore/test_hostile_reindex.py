"""A dataset extracted into a store that already indexes its clips must agree with the index.

The index keeps each clip's label and splits from the dataset that added it. Before, extracting a
relabelled or re-split version of the dataset into the same store (to add an encoder, or resume)
kept the old labels and splits without a word: heads trained on them and fusion scored on them.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from tests.featurestore.test_extract_support import make_dataset

from featurestore.extract import extract
from featurestore.store import open_store

RUN = dict(device="cpu", batch_size=2, num_workers=0, chunk_clips=2, progress=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("reindex") / "data", 4)


def _store(tmp_path, dataset):
    path = tmp_path / "s.zarr"
    extract(dataset, path, "logmel", **RUN)
    return path


def _relabelled(dataset, i: int, **change):
    clips = list(dataset.clips)
    clips[i] = replace(clips[i], **change)
    return replace(dataset, clips=clips)


def _index(path):
    with open_store(path) as store:
        return store.n_clips, list(store.labels), store.splits(), store.feature_sets()


def test_a_relabelled_clip_is_refused_naming_it_and_the_store_is_unchanged(tmp_path, dataset):
    path = _store(tmp_path, dataset)
    before = _index(path)
    other = next(c for c in dataset.classes if c != dataset.clips[1].label)
    with pytest.raises(ValueError, match=rf"gives clip '{dataset.clips[1].clip_id}' label '{other}', but .* has it "
                                         rf"label '{dataset.clips[1].label}'"):
        extract(_relabelled(dataset, 1, label=other), path, "frames/32", **RUN)
    assert _index(path) == before


def test_a_clip_moved_out_of_a_split_is_refused(tmp_path, dataset):
    path = _store(tmp_path, dataset)
    moved = _relabelled(dataset, 2, splits=frozenset({"fold1_evaluate"}))  # every other clip: fold1_train
    with pytest.raises(ValueError, match=rf"gives clip '{dataset.clips[2].clip_id}' not in split 'fold1_train', "
                                         r"but .* has it in it"):
        extract(moved, path, "frames/32", **RUN)


def test_an_added_dataset_relabelling_an_indexed_clip_adds_nothing(tmp_path, dataset):
    path = _store(tmp_path, dataset)
    before = _index(path)
    bigger = make_dataset(tmp_path / "more", 6)  # the same 4 clip ids, and two new ones
    other = next(c for c in bigger.classes if c != bigger.clips[0].label)
    with pytest.raises(ValueError, match=rf"gives clip '{bigger.clips[0].clip_id}' label '{other}'"):
        extract(_relabelled(bigger, 0, label=other), path, "logmel", **RUN)
    assert _index(path) == before


def test_the_same_dataset_or_one_without_labels_or_splits_is_accepted(tmp_path, dataset):
    """Guards: a new encoder over the same dataset, and a manifest that says nothing about labels and
    splits (evaluation data listing the same clips) are not refused."""
    path = _store(tmp_path, dataset)
    extract(dataset, path, "frames/32", **RUN)
    bare = replace(dataset, clips=[replace(c, label=None, splits=frozenset()) for c in dataset.clips])
    summary = extract(bare, path, "frames/16", **RUN)
    assert summary.clips_done == 4
    with open_store(path) as store:
        assert [store.classes[i] for i in store.labels] == [c.label for c in dataset.clips]
        assert np.asarray(store.done_mask("frames/16")).all()
