"""A bounded LRU cache of decoded chunks.

Plain Zarr v3 indexing costs ~0.5 ms per call (async machinery, codec pipeline), which is ~25x an
h5py row read. Most access is local (a clip, then its neighbours; training epochs walk blocks), so
keeping whole decoded chunks makes a warm ``get`` a dict lookup plus a slice.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

import numpy as np


class ChunkCache:
    """Least-recently-used map of chunk key -> decoded array, bounded by total bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> np.ndarray | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Hashable, value: np.ndarray) -> None:
        if value.nbytes > self.max_bytes:
            return
        value.setflags(write=False)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._items[key] = value
            self._bytes += value.nbytes
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.nbytes

    def drop(self, prefix: str) -> None:
        """Forget every chunk of the array at ``prefix`` (keys are ``(path, ...)`` tuples)."""
        with self._lock:
            for key in [k for k in self._items if k[0] == prefix]:
                self._bytes -= self._items.pop(key).nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes
