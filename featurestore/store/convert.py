"""Copy a store between backends (Zarr <-> HDF5) with every array and attribute, in the current layout.

Feature sets are rewritten in the current layout: each chunk (what writers wrote whole, kept as it
was) becomes a shard of inner chunks of ``default_inner_clips``, so converting a store written
before sharding gives it random reads that decode a few clips, not a whole chunk. Every other
array keeps its chunking.

A local destination is written under a temporary name beside it and renamed into place at the end,
so a killed conversion leaves no half-written store at the destination (only the temporary, which
the next conversion to that destination replaces); a destination that is a symbolic link to a store
replaces the store it names and keeps the link. A conversion that fails (a full disk, a file-size
limit) removes the temporary itself and raises ``OutputWriteError`` naming the destination and the
cause; the source is only read, and a store already at the destination is left as it was. The
source's writer lock is held meanwhile, so the copy is never taken while an extraction writes it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from featurestore.atomic_files import OutputWriteError, describe_os_error, find_os_error
from featurestore.errors import FeatureStoreError, StoreFormatError
from featurestore.store._backend import STRING, backend_for
from featurestore.store._remote import RemoteStoreError
from featurestore.store.arrays import StoreArrays
from featurestore.store.layout import SCHEMA_VERSION, default_inner_clips
from featurestore.store.lock import StoreLockedError, writer_lock
from featurestore.store.row_group import FEATURE_SETS
from featurestore.store.store import FeatureStore, open_store


def convert_store(src: str | Path, dst: str | Path, progress: bool = True) -> int:
    """Copy ``src`` into a new store at ``dst`` (backend chosen by ``dst``'s name); returns arrays copied.

    The destination's backend is what ``backend_for(dst, new=True)`` says: HDF5 for a
    ``.h5``/``.hdf5`` name, else Zarr (a store already at ``dst`` is replaced, whatever it is).

    Copies block by block (one chunk of rows at a time), so stores larger than memory convert. An
    existing store at a local ``dst`` is replaced only once the copy is complete. Feature sets are
    written in the current layout (see the module docstring), whatever layout the source has.

    Raises:
        OutputWriteError: the destination could not be written (disk full, file-size limit, ...);
            no temporary copy is left and a store already at ``dst`` is unchanged.
        StoreFormatError: ``dst`` is the source, holds it or lies inside it, or is something other
            than a feature store (a dataset folder, a home directory): replacing it would delete
            what it holds, so nothing is written.
    """
    dst_text = str(dst)
    if "://" in dst_text:  # object stores have no rename: written in place
        _check_url_destination(str(src), dst_text)
        return _copy(src, dst_text, dst_text, progress)
    final = Path(dst_text)
    if final.is_symlink():  # a link to a store: the store it names is replaced, the link kept
        final = Path(os.path.realpath(final))
    _check_destination(src, final)
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


def _check_url_destination(src: str, dst: str) -> None:
    """Refuse a URL destination that is the source or holds it, or lies inside it: it is cleared and
    written in place, so the source would be deleted while it is read."""
    a, b = src.rstrip("/") + "/", dst.rstrip("/") + "/"
    if a.startswith(b) or b.startswith(a):
        raise StoreFormatError(f"cannot convert {src} into {dst}: one lies inside the other (or they are the "
                               f"same), and the destination is cleared before it is written")


def _check_destination(src: str | Path, final: Path) -> None:
    """Refuse a local destination whose replacement would delete more than an old store: the source
    itself or a folder holding it, a place inside the source, or anything that is not a store."""
    if "://" not in str(src):
        source, target = Path(src).resolve(), final.resolve()
        if source == target or target in source.parents:
            raise StoreFormatError(f"cannot convert {src} into {final}: the destination holds the source, "
                                   f"and replacing it would delete the source")
        if source in target.parents:
            raise StoreFormatError(f"cannot convert {src} into {final}: the destination lies inside the source store")
    if final.exists() or final.is_symlink():
        try:
            open_store(final, "r").close()
        except (FeatureStoreError, OSError) as err:
            raise StoreFormatError(f"{final} exists and is not a feature store ({err}); convert replaces only a "
                                   f"store: remove it yourself or choose another destination") from err


@contextlib.contextmanager
def _source_locked(src: str | Path) -> Iterator[None]:
    """Hold the source's writer lock while copying it: a copy read while ``extract`` or ``heads
    predict`` writes could take a chunk's data before a write and its done flags after it (rows
    marked done holding fill values), so a running writer refuses the conversion in one line
    (`StoreLockedError`, naming it). A source in a place where no lock file can be made (a read-only
    directory, a bucket this user may only read) has no writer either, and is copied without one."""
    lock = writer_lock(src, command=f"featurestore convert {src}")
    try:
        lock.acquire()
    except StoreLockedError:
        raise
    except (OSError, RemoteStoreError):
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _copy(src: str | Path, dst: str, shown: str, progress: bool, backend: str | None = None) -> int:
    with _source_locked(src), open_store(src, "r") as source:
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
    layouts = _feature_layouts(source)
    with _writing(shown, "creating its groups"):
        for group in groups:
            ta.create_group(group)
    for path in tqdm(arrays, desc=f"convert -> {Path(shown).name}", disable=not progress, unit="array"):
        shape, dtype = sa.shape(path), sa.dtype(path)
        rows, inner = layouts.get(path) or _kept_layout(sa, path)
        with _writing(shown, f"creating {path}"):
            ta.create_array(path, shape, dtype, rows, "" if dtype == STRING else 0, compressor=sa.compressor(path),
                            inner_rows=inner)
        for start in range(0, shape[0], rows):  # whole chunks of the destination: one write each
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


def _feature_layouts(source: FeatureStore) -> dict[str, tuple[int, int | None]]:
    """``(chunk rows, inner rows)`` of each feature set's value array in the current layout: its
    chunk rows kept (the set's ``done`` and ``errors`` and its writers are aligned to them), inner
    chunks of ``default_inner_clips``."""
    out: dict[str, tuple[int, int | None]] = {}
    for group in source.row_groups(FEATURE_SETS):
        shape, dtype, rows = group.shape, group.dtype, group.chunk_rows
        out[group.values_path] = (rows, default_inner_clips(shape[1], shape[2:], dtype, rows))
    return out


def _kept_layout(arrays: StoreArrays, path: str) -> tuple[int, int | None]:
    """The array's own ``(chunk rows, inner rows)`` (inner None where it is not sharded)."""
    rows, inner = arrays.chunk_rows(path), arrays.inner_rows(path)
    return rows, (inner if inner < rows else None)


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
    if path.is_symlink():
        path.unlink()
    elif path.is_dir():
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
