"""Extraction: run every encoder once over a dataset into a feature store (see ``run.extract``).

The package is torch-free to import: torch and the encoders load once a run has work to do. The
command line is ``featurestore extract`` (built in ``featurestore/cli.py`` with the other commands).
"""
from __future__ import annotations

import warnings
from typing import Any

from featurestore.extract.errors import DecodeWorkerError, ExtractionStopped, StoreWriteError
from featurestore.extract.request import classes_argument, encoder_options_argument
from featurestore.extract.run import DEFAULT_BATCH_SIZE, DEFAULT_ENCODERS, extract
from featurestore.extract.summary import ExtractSummary, FeatureSetSummary
from featurestore.store.lock import StoreLockedError

__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_ENCODERS", "DecodeWorkerError", "ExtractSummary", "ExtractionStopped",
           "FeatureSetSummary", "StoreLockedError", "StoreWriteError", "classes_argument",
           "encoder_options_argument", "extract"]

#: Names that moved to ``featurestore.cli`` with the command line; still importable from here, with a warning.
_MOVED_TO_CLI = {"add_extract_arguments": "add_extract_arguments", "run_extract": "cmd_extract",
                 "main": "extract_main"}


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_CLI:
        import featurestore.cli

        new = _MOVED_TO_CLI[name]
        warnings.warn(f"featurestore.extract.{name} is deprecated; use featurestore.cli.{new}",
                      DeprecationWarning, stacklevel=2)
        return getattr(featurestore.cli, new)
    raise AttributeError(f"module 'featurestore.extract' has no attribute {name!r}")
