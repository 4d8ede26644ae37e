"""The one error decoding raises: it names the file and what was wrong."""
from __future__ import annotations

import os
from pathlib import Path

from featurestore.errors import pickled_by_state

PathLike = str | os.PathLike


class DecodeError(Exception):
    """A media file could not be turned into the samples or frames that were asked for.

    Attributes:
        path: the file.
        reason: what was wrong, in words (``"too short: 4.2 s, expected 10 s"``).
    """

    __reduce__ = pickled_by_state  # its __init__ takes other arguments than its message

    def __init__(self, path: PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
