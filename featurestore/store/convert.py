"""Copy a store between backends (Zarr <-> HDF5) with every array, chunking and attribute intact.

A local destination is written under a temporary name beside it and renamed into place at the end,
so a killed conversion leaves no half-written store at the destination (only the temporary, which
the next conversion to that destination replaces). A conversion that fails (a full disk, a file-size
limit) removes the temporary itself and raises ``OutputWriteError`` naming the destination and the
cause; the source is only read, and a store already at the destination is left as it was.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from featurestore.atomic_files import OutputWriteError, describe_os_error, find_os_error
from featurestore.store._backend import STRING, backend_for
from featurestore.store.store import SCHEMA_VERSION, FeatureStore, open_store


def convert_store(src: str | Path, dst: str | Path, progress: bool = True) -> int:
    """Copy ``src`` into a new store at ``dst`` (backend chosen by ``dst``'s name); returns arrays copied.

    The destination's backend is what ``backend_for(dst, new=True)`` says: HDF5 for a
    ``.h5``/``.hdf5`` name, else Zarr (a store already at ``dst`` is replaced, whatever it is).

    Copies block by block (one chunk of rows at a time), so stores larger than memory convert. An
    existing store at a local ``dst`` is replaced only once the copy is complete.

    Raises:
        OutputWriteError: the destination could not be written (disk full, file-size limit, ...);
            no temporary copy is left and a store already at ``dst`` is unchanged.
    """
    dst_text = str(dst)
    if "://" in dst_text:  # object stores have no rename: written in place
        return _copy(src, dst_text, dst_text, progress)
    final = Path(dst_text)
    tmp = final.with_name(f".{final.name}.converting")
    _remove(tmp)
    backend = backend_for(final, new=True)
    try:
        n_arrays = _copy(src, str(tmp), dst_text, progress, backend)
        with _writing(dst_text, "moving the copy into place"):
            _replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            _remove(tmp)
        raise
    return n_arrays


def _copy(src: str | Path, dst: str, shown: str, progress: bool, backend: str | None = None) -> int:
    with open_store(src, "r") as source:
        with _writing(shown, "creating it"):
            target = open_store(dst, "w", backend=backend)
        try:
            n_arrays = _copy_into(source, target, shown, progress)
        except BaseException:
            with contextlib.suppress(Exception):  # the copy's own error is the one to report
                target.close()
            raise
        with _writing(shown, "closing it"):
            target.close()
    return n_arrays


def _copy_into(source: FeatureStore, target: FeatureStore, shown: str, progress: bool) -> int:
    """Every group, array and attribute of ``source`` into the empty ``target``; returns arrays copied.

    Reads raise the source's own errors (``CorruptChunkError``); writes are wrapped by ``_writing``.
    """
    from tqdm.auto import tqdm

    sa, ta = source.arrays, target.arrays
    arrays, groups = sa.arrays(), sa.groups()
    with _writing(shown, "creating its groups"):
        for group in groups:
            ta.create_group(group)
    for path in tqdm(arrays, desc=f"convert -> {Path(shown).name}", disable=not progress, unit="array"):
        shape, rows, dtype = sa.shape(path), sa.chunk_rows(path), sa.dtype(path)
        with _writing(shown, f"creating {path}"):
            ta.create_array(path, shape, dtype, rows, "" if dtype == STRING else 0, compressor=sa.compressor(path))
        for start in range(0, shape[0], rows):
            stop = min(shape[0], start + rows)
            block = sa.read(path, start, stop, written=False)
            if len(block):
                with _writing(shown, f"writing {path} rows {start}:{stop}"):
                    ta.write(path, start, block)
    with _writing(shown, "writing attributes"):
        for group in groups + arrays:
            ta.set_attrs(group, sa.attrs(group))
        # the root last (it commits the row count; a version 1 source has none recorded). The
        # copy wrote every chunk, so it is a current-schema store whatever the source was
        ta.set_attrs("", {**sa.attrs(""), "n_clips": source.n_clips, "schema_version": SCHEMA_VERSION})
        target.index.forget()
        lookup = target.index.write_missing()  # a source in the layout before the id lookup gets one
        if lookup:
            ta.set_attrs("", lookup)
    return len(arrays)


@contextlib.contextmanager
def _writing(dst: str, doing: str) -> Iterator[None]:
    """A failed write to the destination (an OSError, possibly wrapped by the storage library)
    becomes one ``OutputWriteError`` naming the destination, what was being written and the cause."""
    try:
        yield
    except OutputWriteError:
        raise
    except Exception as err:
        os_error = find_os_error(err)
        if os_error is None:
            raise
        raise OutputWriteError(f"could not convert into {dst}: {describe_os_error(os_error)} while {doing}; "
                               f"the source is unchanged and no partial copy is left") from err


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
