"""Copy a store between backends (Zarr <-> HDF5) with every array, chunking and attribute intact."""
from __future__ import annotations

from pathlib import Path

from featurestore.store._backend import STRING, join
from featurestore.store.store import open_store


def convert_store(src: str | Path, dst: str | Path, progress: bool = True) -> int:
    """Copy ``src`` into a new store at ``dst`` (backend chosen by ``dst``'s name); returns arrays copied.

    Copies block by block (one chunk of rows at a time), so stores larger than memory convert.
    """
    from tqdm.auto import tqdm

    with open_store(src, "r") as source:
        arrays = _walk(source._b, "")
        target = open_store(dst, "w")
        try:
            tb, sb = target._b, source._b
            for group in _groups(sb, ""):
                tb.create_group(group)
            for path in tqdm(arrays, desc=f"convert -> {Path(str(dst)).name}", disable=not progress, unit="array"):
                shape, rows, dtype = sb.shape(path), sb.chunk_rows(path), sb.dtype(path)
                tb.create_array(path, shape, dtype, rows, "" if dtype == STRING else 0)
                for start in range(0, shape[0], rows):
                    block = sb.read(path, start, min(shape[0], start + rows))
                    if len(block):
                        tb.write(path, start, block)
            for group in [""] + _groups(sb, "") + arrays:
                tb.set_attrs(group, sb.get_attrs(group))
        finally:
            target.close()
    return len(arrays)


def _walk(backend, path: str) -> list[str]:
    out = []
    for child in backend.children(path):
        full = join(path, child)
        out += [full] if backend.is_array(full) else _walk(backend, full)
    return out


def _groups(backend, path: str) -> list[str]:
    out = []
    for child in backend.children(path):
        full = join(path, child)
        if not backend.is_array(full):
            out += [full] + _groups(backend, full)
    return out
