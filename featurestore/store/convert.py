"""Copy a store between backends (Zarr <-> HDF5) with every array, chunking and attribute intact.

A local destination is written under a temporary name beside it and renamed into place at the end,
so a killed conversion leaves no half-written store at the destination (only the temporary, which
the next conversion to that destination replaces).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from featurestore.store._backend import STRING, backend_for
from featurestore.store.store import SCHEMA_VERSION, open_store


def convert_store(src: str | Path, dst: str | Path, progress: bool = True) -> int:
    """Copy ``src`` into a new store at ``dst`` (backend chosen by ``dst``'s name); returns arrays copied.

    The destination's backend is what ``backend_for(dst, new=True)`` says: HDF5 for a
    ``.h5``/``.hdf5`` name, else Zarr (a store already at ``dst`` is replaced, whatever it is).

    Copies block by block (one chunk of rows at a time), so stores larger than memory convert. An
    existing store at a local ``dst`` is replaced only once the copy is complete.
    """
    dst_text = str(dst)
    if "://" in dst_text:  # object stores have no rename: written in place
        return _copy(src, dst_text, dst_text, progress)
    final = Path(dst_text)
    tmp = final.with_name(f".{final.name}.converting")
    _remove(tmp)
    backend = backend_for(final, new=True)
    n_arrays = _copy(src, str(tmp), dst_text, progress, backend)
    _replace(tmp, final)
    return n_arrays


def _copy(src: str | Path, dst: str, shown: str, progress: bool, backend: str | None = None) -> int:
    from tqdm.auto import tqdm

    with open_store(src, "r") as source:
        sa = source.arrays
        arrays = sa.arrays()
        groups = sa.groups()
        target = open_store(dst, "w", backend=backend)
        try:
            ta = target.arrays
            for group in groups:
                ta.create_group(group)
            for path in tqdm(arrays, desc=f"convert -> {Path(shown).name}", disable=not progress, unit="array"):
                shape, rows, dtype = sa.shape(path), sa.chunk_rows(path), sa.dtype(path)
                ta.create_array(path, shape, dtype, rows, "" if dtype == STRING else 0,
                                compressor=sa.compressor(path))
                for start in range(0, shape[0], rows):
                    block = sa.read(path, start, min(shape[0], start + rows), written=False)
                    if len(block):
                        ta.write(path, start, block)
            for group in groups + arrays:
                ta.set_attrs(group, sa.attrs(group))
            # the root last (it commits the row count; a version 1 source has none recorded). The
            # copy wrote every chunk, so it is a current-schema store whatever the source was
            ta.set_attrs("", {**sa.attrs(""), "n_clips": source.n_clips, "schema_version": SCHEMA_VERSION})
        finally:
            target.close()
    return len(arrays)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _replace(tmp: Path, final: Path) -> None:
    """Move the finished copy into place; an old store there is set aside first, then deleted."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(f".{final.name}.replaced")
    _remove(old)
    os.replace(final, old)
    os.replace(tmp, final)
    _remove(old)
