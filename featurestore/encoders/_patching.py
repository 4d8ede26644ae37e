"""Module attributes replaced for the length of a block, shared by nested and concurrent blocks.

Two things reach into libraries this way while an encoder is built: recording which weight file
timm or open_clip reads (``_content_hash``) and refusing URL downloads offline (``_weights``).
Blocks nest (a build inside a build) and run on several threads (Dask workers build encoders in
threads), so the attributes are replaced when the first block starts and put back when the last
one ends, under one lock: a per-block save and restore would put back another block's replacement.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

#: ``(object, attribute name, replacement)`` triples, decided when the first block starts.
Replacements = Callable[[], list[tuple[Any, str, Any]]]


class SharedPatch:
    """``with patch():`` runs the block with the attributes ``replacements()`` names replaced."""

    def __init__(self, replacements: Replacements):
        self._replacements = replacements
        self._lock = threading.Lock()
        self._depth = 0
        self._saved: list[tuple[Any, str, Any]] = []

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            self._depth += 1
            if self._depth == 1:
                for owner, name, value in self._replacements():
                    self._saved.append((owner, name, getattr(owner, name)))
                    setattr(owner, name, value)
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    while self._saved:
                        owner, name, original = self._saved.pop()
                        setattr(owner, name, original)
