"""New groups and arrays of a local Zarr store, their ``zarr.json`` written straight to the folder.

zarr-python creates a node through its event loop, and its local store does each file check and
write in a thread of its own: 2-7 ms a group and 3-14 ms an array on this machine, ~0.1 s of the 20
nodes a store's creation and first append make. Here zarr still builds each kind of array's
metadata (in an in-memory group: ~0.5-4 ms), so the JSON is exactly what it would write; only the
file is written directly, whole, through a temp file renamed into place as zarr's local store
writes it. A growing array's new shape is written the same way (``update_metadata``). Parent
groups missing from the path are made as zarr makes them (``ensure_parents``), and an array replaces
whatever was at its path, chunks included, as zarr's ``overwrite=True`` does.
"""
from __future__ import annotations

import os
import shutil
import threading
from typing import Any

import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.group import GroupMetadata
from zarr.core.metadata import ArrayV3Metadata
from zarr.storage import MemoryStore

from featurestore.store._file_writes import replace_file

META = "zarr.json"


def _json(metadata: Any) -> bytes:
    return metadata.to_buffer_dict(default_buffer_prototype())[META].to_bytes()


_GROUP = _json(GroupMetadata(zarr_format=3))


class LocalNodes:
    """Creates the nodes of the local store rooted at ``folder``."""

    def __init__(self, folder: str):
        self.folder = folder
        self._scratch: zarr.Group | None = None  # where zarr builds array metadata (made when first needed)
        self._kinds: dict[str, ArrayV3Metadata] = {}  # metadata zarr built, by options but the shape
        self._lock = threading.Lock()

    def has_metadata(self, path: str) -> bool:
        return os.path.isfile(self._file(path))

    def create_group(self, path: str) -> None:
        """An empty group at ``path`` (and its missing parents); call only where none is."""
        self._parents(path)
        self._write(path, _GROUP)

    def create_array(self, path: str, options: dict[str, Any]) -> ArrayV3Metadata:
        """The array zarr's ``Group.create_array(path, overwrite=True, **options)`` would make; its metadata.

        zarr builds the metadata of each kind of array once (options but the shape: an append
        makes eight alike, 1-4 ms each through zarr's event loop); later ones take that metadata
        with their own shape, as zarr's ``resize`` does."""
        metadata = self._metadata(options)
        folder = os.path.join(self.folder, path)
        if os.path.isdir(folder) and not os.path.islink(folder):
            shutil.rmtree(folder)  # what was there, chunks and all (zarr: delete_dir)
        elif os.path.lexists(folder):
            os.unlink(folder)
        self._parents(path)
        self._write(path, _json(metadata))
        return metadata

    def _metadata(self, options: dict[str, Any]) -> ArrayV3Metadata:
        kind = repr(sorted((k, v) for k, v in options.items() if k != "shape"))
        with self._lock:
            made = self._kinds.get(kind)
            if made is None:
                if self._scratch is None:
                    self._scratch = zarr.open_group(MemoryStore(), mode="w", zarr_format=3)
                made = self._kinds[kind] = self._scratch.create_array("node", overwrite=True, **options).metadata
        return made.update_shape(tuple(options["shape"]))

    def update_metadata(self, path: str, metadata: ArrayV3Metadata) -> None:
        """Replace the array's ``zarr.json`` with ``metadata`` (a new shape: zarr's ``resize`` of a
        growing array writes only this)."""
        self._write(path, _json(metadata))

    def _parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            parent = "/".join(parts[:depth])
            if not self.has_metadata(parent):
                self._write(parent, _GROUP)

    def _write(self, path: str, body: bytes) -> None:
        replace_file(self._file(path), [body])  # (its folder made when missing)

    def _file(self, path: str) -> str:
        return os.path.join(self.folder, path, META)
