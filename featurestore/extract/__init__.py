"""Extraction: run every encoder once over a dataset into a feature store (see ``run.extract``).

The package is torch-free to import: torch and the encoders load once a run has work to do. The
command line is ``featurestore extract`` (built in ``featurestore/cli.py`` with the other commands).
"""
from __future__ import annotations

from featurestore.extract.errors import DecodeWorkerError, ExtractionStopped, StoreWriteError
from featurestore.extract.request import classes_argument, encoder_options_argument
from featurestore.extract.run import DEFAULT_BATCH_SIZE, DEFAULT_ENCODERS, extract
from featurestore.extract.summary import ExtractSummary, FeatureSetSummary
from featurestore.store.lock import StoreLockedError

__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_ENCODERS", "DecodeWorkerError", "ExtractSummary", "ExtractionStopped",
           "FeatureSetSummary", "StoreLockedError", "StoreWriteError", "classes_argument",
           "encoder_options_argument", "extract"]
