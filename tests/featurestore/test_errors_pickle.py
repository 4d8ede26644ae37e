"""Errors cross process boundaries (Dask tasks, joblib sweep trials, DataLoader workers) by pickle.

Python pickles an exception as ``(type, args)`` and rebuilds it by calling ``type(*args)``; for the
errors whose ``__init__`` takes other arguments than their message, that failed in the receiving
process with a TypeError ("missing 3 required positional arguments"), so a task's
``MissingFeatureError`` reached the driver as an unpickling error instead of itself.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from featurestore.datasets._common import DatasetFormatError, MissingFilesError
from featurestore.decode._errors import DecodeError
from featurestore.encoders._names import UnknownEncoderError
from featurestore.errors import (CorruptChunkError, FingerprintMismatchError, MissingChunkError, MissingFeatureError,
                                 UnknownClipError, UnknownFeatureError, UnknownValueError)
from featurestore.store.lock import StoreLockedError
from heads.checkpoint import NonFiniteWeightsError
from heads.errors import FeatureFingerprintError, UnknownHeadError

ERRORS = [
    CorruptChunkError("features/x/data", 0, 16, ValueError("crc32c mismatch")),
    MissingChunkError("features/x/data", 16, 32),
    MissingFeatureError("clip/ViT-B-32", ["a-1", "b-2"]),
    UnknownFeatureError("feature set", "clip/ViT-B-23", ["clip/ViT-B-32"]),
    UnknownValueError("split", "fold1_tran", ["fold1_train", "fold1_evaluate"]),
    UnknownClipError("airport-x", ["airport-y"]),
    FingerprintMismatchError("logmel", {"encoder": "logmel", "n_mels": 40}, {"encoder": "logmel", "n_mels": 64}),
    StoreLockedError("s.zarr", Path("s.zarr.lock"), {"pid": 12, "host": "h"}),
    UnknownEncoderError("encoder family", "timn", ["timm", "clip"]),
    DatasetFormatError(Path("meta.csv"), 3, "a label column is missing"),
    MissingFilesError([Path("audio/a.wav")], 10, "tau"),
    DecodeError(Path("video/a.mp4"), "no video stream"),
    FeatureFingerprintError("runs/r", "logmel", "abc", "def"),
    UnknownHeadError("late_fusoin", ["late_fusion"]),
    NonFiniteWeightsError("weights hold NaN", ["fc.weight"]),
]


@pytest.mark.parametrize("err", ERRORS, ids=lambda e: type(e).__name__)
def test_an_error_pickled_in_a_worker_is_the_same_error_in_the_caller(err):
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and str(back) == str(err) and back.args == err.args
    assert {k: str(v) for k, v in vars(back).items()} == {k: str(v) for k, v in vars(err).items()}
