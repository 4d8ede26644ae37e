"""Verify's walk over a local Zarr store's ``zarr.json`` files: which are damaged, which arrays are whole.

zarr lists a group by reading every child's metadata, so one damaged ``zarr.json`` (truncated, not
JSON, JSON of the wrong shape) makes listing its parent fail, and with it every check of the store.
This walk reads each node's metadata file itself, as zarr would parse it, so ``verify`` reports the
damaged files by name and still checks every array whose own metadata is whole (zarr opens an array
by its path without reading the groups above it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from featurestore.store._backend import join

META = "zarr.json"


@dataclass
class MetadataScan:
    """What the walk found: arrays whose metadata parses (depth first, sorted per level, as
    ``StoreArrays.arrays`` lists them) and damaged nodes (path -> what is wrong)."""

    arrays: list[str] = field(default_factory=list)
    damaged: dict[str, str] = field(default_factory=dict)

    def file(self, node: str) -> str:
        """The metadata file of ``node``, relative to the store."""
        return join(node, META)

    def touches(self, top: str) -> bool:
        """Whether a damaged node is ``top``, under it, or above it (the root)."""
        return any(n == "" or n == top or n.startswith(top + "/") for n in self.damaged)


def local_root(location: str) -> Path | None:
    """The directory of a local store at ``location`` (a path or ``file://`` URL); None for a URL."""
    root = location.removeprefix("file://")
    return None if "://" in root else Path(root)


def scan_metadata(location: str) -> MetadataScan | None:
    """Walk the nodes of the local Zarr store at ``location``; None for anything else (a URL, HDF5)."""
    root = local_root(location)
    if root is None or not (root / META).is_file():
        return None
    scan = MetadataScan()
    _walk(root, "", scan)
    return scan


def _walk(root: Path, node: str, scan: MetadataScan) -> None:
    """One node: an array ends the walk; a group (or a node whose metadata is damaged, which may
    have been one) goes on into its sub-folders that hold a ``zarr.json``."""
    kind, problem = node_kind(root / node / META)
    if problem:
        scan.damaged[node] = problem
    if kind == "array":
        scan.arrays.append(node)
        return
    folder = root / node
    for child in sorted(p.name for p in folder.iterdir() if p.is_dir() and (p / META).is_file()):
        _walk(root, join(node, child), scan)


def node_kind(path: Path) -> tuple[str | None, str | None]:
    """``("array" | "group", None)``, or ``(None, what is wrong)`` with the file, as zarr would parse
    it (the walk here, and the local backend's node lookups: ``ZarrBackend._local_node``)."""
    from zarr.core.group import GroupMetadata
    from zarr.core.metadata.v3 import ArrayV3Metadata

    try:
        meta = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None, f"metadata file is not valid JSON ({_line(err)})"
    if not isinstance(meta, dict):
        return None, f"metadata file holds a JSON {type(meta).__name__}, not an object"
    if meta.get("node_type") not in ("array", "group"):
        return None, f"metadata file is not a Zarr v3 array or group (node_type {meta.get('node_type')!r})"
    kind = meta["node_type"]
    try:
        (ArrayV3Metadata if kind == "array" else GroupMetadata).from_dict(dict(meta))
    except Exception as err:  # noqa: BLE001 - whatever zarr refuses in it is the finding
        return None, f"metadata file is not a valid Zarr v3 {kind} ({type(err).__name__}: {_line(err)})"
    return kind, None


def _line(err: Exception) -> str:
    return " ".join(str(err).split())
