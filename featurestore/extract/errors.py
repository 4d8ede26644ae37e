"""Errors that stop or refuse an extraction run (no torch import: the CLI maps them to exit codes).

Each leaves the store consistent: every chunk written before the error is complete and marked done,
nothing else is marked done, so ``verify`` is clean and rerunning the same command resumes. A run
refused before its pipeline starts leaves no store it created itself.
"""
from __future__ import annotations

import errno

from featurestore.errors import FeatureStoreError

__all__ = ["DecodeWorkerError", "ExtractionInterrupted", "ExtractionStopped", "SchedulerError", "StoreWriteError",
           "hdf5_with_dask", "store_write_error"]

#: errno values that mean "no room": the disk, a quota, or a file-size limit.
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class ExtractionStopped(FeatureStoreError):
    """The run stopped before the end; the store holds every chunk finished so far (exit code 1)."""


class StoreWriteError(ExtractionStopped):
    """Writing to the store failed (disk full, file-size limit, I/O error)."""


class DecodeWorkerError(ExtractionStopped):
    """A decode worker process died or could not hand a batch over (shared memory full, limits)."""


class SchedulerError(FeatureStoreError):
    """``scheduler=`` names no Dask scheduler that answers (exit code 2: the run is refused before the
    store is created)."""


class ExtractionInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped the run; the message says what the store kept and how to resume.

    A KeyboardInterrupt still, so that a script or notebook calling ``extract`` stops as it would;
    ``featurestore extract`` prints ``interrupted; <message>`` as one line and exits 130 (like
    ``heads``)."""


def hdf5_with_dask(location: str) -> ValueError:
    """The refusal of an HDF5 store for a Dask run (before the run takes its lock or makes the store)."""
    return ValueError(f"{location}: an HDF5 file cannot be written by several processes; extract into a Zarr "
                      f"store and convert it ('featurestore convert') afterwards")


def store_write_error(store: str, err: OSError, doing: str) -> StoreWriteError:
    """One line naming the store, what was being written, the cause and the way out."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "disk full" if err.errno == errno.ENOSPC else "disk quota exceeded"
        return StoreWriteError(f"{store}: {what} while {doing}; free space and rerun to resume")
    if err.errno == errno.EFBIG:
        return StoreWriteError(f"{store}: file size limit exceeded while {doing} (see 'ulimit -f'); "
                               f"raise the limit and rerun to resume")
    cause = err.strerror or str(err)
    where = f" ({err.filename})" if err.filename else ""
    return StoreWriteError(f"{store}: {cause}{where} while {doing}; fix the cause and rerun to resume")
