"""Where a local Zarr v3 array keeps its chunk (or shard) files, read from its own metadata.

The store writes keys ``c.<i>.0.0`` (separator '.': every chunk file in the array's folder); stores
made before that, and converted ones' sources, have ``c/<i>/0/0``. Tests that damage or count chunk
files find them here instead of spelling either layout, so they test the store whichever it writes.
"""
from __future__ import annotations

import json
from pathlib import Path


def _metadata(store, array: str) -> dict:
    return json.loads(Path(store, array, "zarr.json").read_text())


def separator(store, array: str) -> str:
    """The chunk key separator of the array at ``store``/``array`` ('/' or '.')."""
    return key_separator(_metadata(store, array))


def key_separator(meta: dict) -> str:
    """The chunk key separator of an array's metadata (its ``zarr.json``); only the "default" encoding
    (keys that start with "c") is known here: another would make every key below wrong, so it is refused."""
    encoding = meta["chunk_key_encoding"]
    if encoding["name"] != "default":
        raise ValueError(f"chunk key encoding {encoding['name']!r}, not 'default'")
    return encoding.get("configuration", {}).get("separator", "/")


def chunk_key(meta: dict, chunk: int = 0) -> str:
    """The key (relative to the array) of chunk (or shard) ``chunk`` along the clip axis of an array
    whose metadata is ``meta``: for stores that are not local folders (an S3 bucket)."""
    return key_separator(meta).join(["c", str(chunk)] + ["0"] * (len(meta["shape"]) - 1))


def chunk_file(store, array: str, chunk: int = 0) -> Path:
    """The file of chunk (or shard) ``chunk`` along the clip axis of the array at ``store``/``array``."""
    return Path(store, array, chunk_key(_metadata(store, array), chunk))


def chunk_files(store, array: str) -> list[Path]:
    """Every chunk file of the array (temp files of unfinished writes left out), sorted."""
    folder = Path(store, array)
    files = (folder / "c").rglob("*") if separator(store, array) == "/" else folder.glob("c.*")
    return sorted(p for p in files if p.is_file() and not p.name.endswith(".partial"))


def arrays(store) -> list[str]:
    """The paths (relative to ``store``, '/'-separated) of every array in the store, sorted."""
    root = Path(store)
    found = (meta.parent for meta in root.rglob("zarr.json")
             if json.loads(meta.read_text()).get("node_type") == "array")
    return sorted(folder.relative_to(root).as_posix() for folder in found)


def store_chunk_files(store) -> list[Path]:
    """Every chunk file of every array in the store, sorted by array."""
    return [path for array in arrays(store) for path in chunk_files(store, array)]
