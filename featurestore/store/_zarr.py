"""Zarr v3 backend: a directory (or any fsspec URL) with crc32c-checksummed chunks.

Every array is written with ``write_empty_chunks=True``: zarr's default skips (and deletes) chunks
that hold only the fill value, which would make a deleted chunk file indistinguishable from a
chunk of fill values. With every written chunk on disk, a missing chunk is always damage, and the
store can refuse to serve it (``chunk_written``) instead of returning zeros.

Feature arrays are sharded (Zarr v3's ``sharding_indexed`` codec, see ``_shards.py``): a shard file
holds whole blocks of clips (the unit writers own) as small inner chunks, each sealed with its own
crc32c, and an index of where each inner chunk is. Whole-shard writes and inner-chunk reads go
straight to the bytes (zarr-python's per-chunk machinery costs ~45x a memmap on random reads); the
files are the standard format, which zarr-python reads and writes as well.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.array import AsyncArray
from zarr.core.metadata import ArrayV3Metadata
from zarr.core.sync import sync
from zarr.errors import ZarrUserWarning

from featurestore.errors import StoreFormatError
from featurestore.store._backend import COMPRESSORS, STRING, ChunkFault, as_str_array
from featurestore.store._chunk_files import ChunkWriter, PlainLayout
from featurestore.store._local_nodes import LocalNodes
from featurestore.store._remote import is_remote, is_transport_error, remote_error
from featurestore.store._shard_patch import patch_shard
from featurestore.store._shards import ShardLayout, ShardReader, local_file, under
from featurestore.store.verify_metadata import local_root, node_kind, scan_metadata

_CONFIG = {"write_empty_chunks": True}
# chunk keys "c.0.0" in the array's folder, not "c/0/0": a new shard's file needed its own folders
# first (two mkdirs each; ~260 per million clips filled, 0.03-0.35 s of the fill on this machine's
# ext4), and a store has few enough chunk files per array (a few hundred per million clips) for one folder
_CHUNK_KEYS = {"name": "default", "separator": "."}
#: URL schemes whose fsspec filesystems cache directory listings (``ZarrBackend`` turns that off).
_LISTED_SCHEMES = ("s3", "s3a", "gs", "gcs")
#: URL schemes whose fsspec filesystem comes with one of avscene's extras.
_EXTRAS = {"s3": "s3", "s3a": "s3"}


def _missing_filesystem(location: str, err: ImportError) -> str:
    """One line for a URL whose fsspec filesystem is not installed: which package, which extra."""
    scheme = location.split("://")[0]
    fix = f"pip install 'avscene[{_EXTRAS[scheme]}]'" if scheme in _EXTRAS else "install it"
    return f"{location}: {scheme}:// URLs need a filesystem package that is not installed ({err}); {fix}"


@contextlib.contextmanager
def _metadata(location: str, path: str | None = None) -> Iterator[None]:
    """A damaged ``zarr.json`` (not JSON, or JSON that is not the Zarr v3 metadata zarr expects) becomes
    one `StoreFormatError` naming the file and what is wrong in it, by verify's own walk: zarr-python's
    error names a line and a column, or a field, or is a TypeError from deep inside it, or (a node looked
    up by ``path``) says the node is absent. Other failures pass as they are."""
    try:
        yield
    except StoreFormatError:
        raise
    except KeyError:  # an absent node, or one whose metadata zarr cannot read
        if path is not None and _has_metadata_file(location, path):
            _raise_damage(location)
        raise
    except Exception as err:
        if is_transport_error(err, remote=is_remote(location)):  # a failed request (refused, throttled), not damage
            doing = f"reading the metadata of {path}" if path else "reading its metadata"
            raise remote_error(location, err, doing) from None
        _raise_damage(location)
        if isinstance(err, (json.JSONDecodeError, UnicodeDecodeError)):  # a remote store: no walk
            file = f"{location.rstrip('/')}/{path}/zarr.json" if path else f"{location}: a zarr.json metadata file"
            raise StoreFormatError(f"{file} is not valid JSON ({err}); the store's metadata is damaged (restore "
                                   f"the file, or the store from a copy)") from None
        raise


def _raise_damage(location: str) -> None:
    """Raise `StoreFormatError` for the first damaged ``zarr.json`` of a local store, if there is one."""
    scan = scan_metadata(location)
    if scan is not None and scan.damaged:
        node, problem = next(iter(scan.damaged.items()))
        file = local_root(location) / scan.file(node)
        raise StoreFormatError(f"{file}: {problem}; the store's metadata is damaged (restore the file, "
                               f"or the store from a copy)") from None


def _remote_open_error(location: str, err: Exception, options: dict) -> Exception:
    """What to raise for a store at a URL that could not be opened: one line naming the URL.

    zarr says "No group found in store ... at path ''" both where the URL names no store and where
    its bucket does not exist; s3fs's errors (refused credentials, no endpoint) name no URL at all."""
    if is_transport_error(err, remote=True):
        return remote_error(location, err, "opening it")
    if type(err).__name__ != "GroupNotFoundError":
        return err
    return FileNotFoundError(f"no feature store at {location} (no zarr.json there{_bucket_note(location, options)})")


def _bucket_note(location: str, options: dict) -> str:
    """``; the bucket 'b' does not exist`` where that is why nothing was found at an object-store URL."""
    try:
        import fsspec

        fs, path = fsspec.url_to_fs(location, **options)
        bucket = path.split("/", 1)[0]
        return "" if not bucket or fs.exists(bucket) else f"; the bucket {bucket!r} does not exist or cannot be seen"
    except Exception:  # noqa: BLE001 - only a hint: the error says what was not found either way
        return ""


def _has_metadata_file(location: str, path: str) -> bool:
    root = local_root(location)
    return root is not None and (root / path / "zarr.json").is_file()


class ZarrBackend:
    """Zarr v3 group; chunks are whole blocks of rows, each sealed with a crc32c checksum."""

    kind = "zarr"

    def __init__(self, location: str, mode: str, storage_options: dict | None = None):
        self.location = location
        self.read_only = mode == "r"
        options = dict(storage_options or {})
        scheme = location.split("://")[0] if "://" in location else ""
        if scheme in ("file", "local"):
            # object stores need no directories; fsspec's local filesystem does, and only
            # creates them when asked to
            options.setdefault("auto_mkdir", True)
        elif scheme in _LISTED_SCHEMES:
            # s3fs/gcsfs keep every listing for the life of a filesystem instance, and fsspec shares one
            # instance per set of options in a process: a store listed once would never show a feature
            # set another process added (nor lose one it deleted), even opened anew or after refresh()
            options.setdefault("use_listings_cache", False)
        kwargs = {"storage_options": options} if options and "://" in location else {}
        self._open_kwargs = kwargs
        try:
            with _metadata(location):
                self._root = zarr.open_group(location, mode=mode, zarr_format=3, **kwargs)
        except ImportError as err:  # fsspec names the missing package (s3fs, gcsfs) in a traceback
            raise ValueError(_missing_filesystem(location, err)) from None
        except Exception as err:
            if not is_remote(location):
                raise
            raise _remote_open_error(location, err, options) from None
        self._arrays: dict[str, zarr.Array] = {}
        self._layouts: dict[str, ShardLayout | None] = {}  # sharded arrays the fast path knows
        self._rows: dict[str, tuple[int, int]] = {}  # path -> (chunk rows, inner rows): asked per get
        self._plain: dict[str, PlainLayout | None] = {}  # local unsharded arrays read from their files
        self._writers: dict[str, ChunkWriter | None] = {}  # local unsharded arrays written to their files
        self._fresh = [0]  # reads that met files anew, the shard reader's included: ``fresh_reads``
        self._shards = ShardReader(self._fresh)
        self._folder = local_file(self._root, "")  # a local store's folder: its nodes are looked up there
        self._nodes = LocalNodes(self._folder) if self._folder is not None and not self.read_only else None

    def _node(self, path: str):
        with _metadata(self.location, path):
            return self._root[path] if path else self._root

    def _array(self, path: str) -> zarr.Array:
        arr = self._arrays.get(path)
        if arr is None:
            with _metadata(self.location, path):
                arr = self._root[path].with_config(_CONFIG)
            self._arrays[path] = arr
        return arr

    def _local_node(self, path: str) -> str | None:
        """The ``node_type`` a local store's ``zarr.json`` at ``path`` names: "array", "group", None
        where the file is absent, and "?" where zarr could not take it as a Zarr v3 node's metadata
        (zarr then looks and names the damage). A file read and zarr's own parse of it
        (``verify_metadata.node_kind``: 20-130 us), not a trip through zarr's event loop (0.3-4 ms a
        lookup, ~0.1 s of a million-clip store's creation)."""
        file = os.path.join(self._folder, path, "zarr.json")
        if not os.path.isfile(file):
            return None
        kind, problem = node_kind(Path(file))
        return "?" if problem else kind

    def exists(self, path: str) -> bool:
        if not path or path in self._arrays:
            return True
        if self._folder is not None:
            kind = self._local_node(path)
            if kind in ("array", "group"):
                return True
            if kind is None:
                return False
        try:
            with _metadata(self.location, path):
                self._root[path]
        except KeyError:
            return False
        return True

    def is_array(self, path: str) -> bool:
        # Looking a node up costs a metadata read (~0.3 ms): remember arrays once found, so that
        # the name check in every ``store.get`` stays a dict lookup.
        if path in self._arrays:
            return True
        if not path:
            return False
        if self._folder is not None and self._local_node(path) in (None, "group"):
            return False
        try:
            with _metadata(self.location, path):
                node = self._root[path]
        except KeyError:
            return False
        if isinstance(node, zarr.Array):
            self._arrays[path] = node.with_config(_CONFIG)
            return True
        return False

    def children(self, path: str) -> list[str]:
        if self._folder is not None and self._local_node(path) == "group":
            return self._local_children(path)
        node = self._node(path)
        with _metadata(self.location), warnings.catch_warnings():
            warnings.simplefilter("ignore", ZarrUserWarning)  # "not recognized": a damaged child, found below
            names = sorted(name for name, _ in node.members(max_depth=0))
        folder = local_file(node, "")
        if folder is not None and os.path.isdir(folder):
            # zarr leaves out (with a warning) a child whose metadata it cannot read: a feature set
            # would vanish from listings without a word
            on_disk = {e.name for e in os.scandir(folder) if e.is_dir() and os.path.isfile(os.path.join(e.path, "zarr.json"))}
            if on_disk - set(names):
                _raise_damage(self.location)
        return names

    def _local_children(self, path: str) -> list[str]:
        """The nodes in a local group's folder, each checked to be a Zarr v3 node (a damaged one is
        named, where zarr would leave it out of its listing with a warning)."""
        folder = os.path.join(self._folder, path)
        names = sorted(e.name for e in os.scandir(folder)
                       if e.is_dir() and os.path.isfile(os.path.join(e.path, "zarr.json")))
        if any(self._local_node(f"{path}/{name}" if path else name) == "?" for name in names):
            _raise_damage(self.location)
        return names

    def get_attrs(self, path: str) -> dict[str, Any]:
        return dict(self._node(path).attrs)

    def read_attr(self, path: str, key: str) -> Any:
        """One attribute read anew; a local store's ``zarr.json`` straight from its file (~25 us,
        against ~0.4 ms through zarr's event loop: readers ask at every re-read of done flags)."""
        if self._folder is not None:
            try:
                with open(os.path.join(self._folder, path, "zarr.json"), "rb") as file:
                    attrs = json.loads(file.read()).get("attributes", {})
                if isinstance(attrs, dict):
                    return attrs.get(key)
            except (OSError, ValueError, AttributeError):
                pass  # absent or damaged: zarr's own read below says what is wrong, in its words
        return self.get_attrs(path).get(key)

    def metadata_token(self, path: str) -> tuple[Any, ...] | None:
        """A local array's ``zarr.json`` identity (inode, times, size; () where it is gone); on S3 and
        GCS the object's ETag and size (one HEAD request: without it a reader holding the store open
        read another writer's float32 shards of a replaced set as float16, every checksum passing);
        None on other URLs (``memory://``: no ETag to tell versions apart)."""
        if self._folder is None:
            return self._object_token(path)
        try:
            st = os.stat(os.path.join(self._folder, path, "zarr.json"))
        except OSError:
            return ()
        return st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size

    def _object_token(self, path: str) -> tuple[Any, ...] | None:
        """(ETag, size) of the array's ``zarr.json`` object, read anew; () where it is gone."""
        store = self._root.store
        if self.location.split("://")[0] not in _LISTED_SCHEMES or not hasattr(store, "fs"):
            return None
        key = "/".join(p for p in (store.path.strip("/"), self._root.store_path.path, path, "zarr.json") if p)
        try:
            info = sync(store.fs._info(key, refresh=True))
        except FileNotFoundError:
            return ()
        except Exception as err:
            if is_transport_error(err, remote=True):
                raise remote_error(self.location, err, f"looking at the metadata of {path}") from None
            raise
        return info.get("ETag"), info.get("size")

    def set_attrs(self, path: str, attrs: dict[str, Any]) -> None:
        # One metadata write for all keys: ``attrs.update`` rewrites zarr.json once per key, so a
        # kill in between would leave a half-described group (e.g. a fingerprint without a shape).
        self._node(path).update_attributes(dict(attrs))

    def create_group(self, path: str) -> None:
        if self._nodes is not None and not self._nodes.has_metadata(path):
            self._nodes.create_group(path)
        elif not self.exists(path):
            self._root.require_group(path)

    def create_array(self, path: str, shape, dtype: str, chunk_rows: int, fill_value,
                     compressor: str | None = None, inner_rows: int | None = None) -> None:
        """A new array; ``inner_rows`` below ``chunk_rows`` makes it sharded (shards of ``chunk_rows``)."""
        chunk_rows = max(1, chunk_rows)
        chunks = (chunk_rows,) + tuple(shape[1:])
        zdtype = str if dtype == STRING else np.dtype(dtype)
        self.forget(path)
        codecs = [ZstdCodec(level=3)] if COMPRESSORS[compressor] == "zstd" else []
        options: dict[str, Any] = {"chunks": chunks}
        if inner_rows is not None and 0 < inner_rows < chunk_rows and dtype != STRING:
            if chunk_rows % inner_rows:
                raise ValueError(f"{path}: inner chunks of {inner_rows} rows do not divide shards of {chunk_rows}")
            options = {"chunks": (inner_rows,) + chunks[1:], "shards": chunks}
        options.update(shape=tuple(shape), dtype=zdtype, fill_value="" if dtype == STRING else fill_value,
                       compressors=[*codecs, Crc32cCodec()], chunk_key_encoding=_CHUNK_KEYS)
        if self._nodes is not None:
            self._keep(path, self._nodes.create_array(path, options))
        else:
            self._root.create_array(path, overwrite=True, config=_CONFIG, **options)

    def _keep(self, path: str, metadata: ArrayV3Metadata) -> None:
        """Know the array at ``path`` by the ``metadata`` just written (not read back through zarr)."""
        self._arrays[path] = zarr.Array(AsyncArray(metadata=metadata, store_path=self._root.store_path / path,
                                                   config=_CONFIG))

    def compressor(self, path: str) -> str | None:
        names = [type(c).__name__ for c in self._array(path).compressors]
        return "zstd" if "ZstdCodec" in names else None

    def forget(self, path: str) -> None:
        """Drop what is known of the array at ``path`` and of the arrays under it ('': all): their
        metadata (shape, dtype, chunking), layouts, shard indexes and maps are read anew when next used."""
        for cache in (self._arrays, self._layouts, self._rows, self._plain, self._writers):
            for key in [k for k in list(cache) if under(k, path)]:  # a copy: other threads may be reading
                cache.pop(key, None)
        self._shards.forget(path)
        if not path:  # the root group's attributes (n_clips, the lookup) are kept by its object
            with _metadata(self.location):
                self._root = zarr.open_group(self.location, mode="r" if self.read_only else "r+", zarr_format=3,
                                             **self._open_kwargs)

    def _layout(self, path: str) -> ShardLayout | None:
        """The shard layout of ``path`` when it is sharded in the layout the fast path reads."""
        if path not in self._layouts:
            self._layouts[path] = ShardLayout.of(self._array(path))
        return self._layouts[path]

    def _plain_layout(self, path: str) -> PlainLayout | None:
        if path not in self._plain:
            self._plain[path] = PlainLayout.of(self._array(path))
        return self._plain[path]

    def chunk_written(self, path: str, chunk: int) -> bool:
        arr = self._array(path)
        coords = (chunk,) + (0,) * (arr.ndim - 1)
        key = arr.metadata.encode_chunk_key(coords)
        file = local_file(arr, key)
        if file is not None:  # a stat, not a trip through zarr's event loop
            return os.path.exists(file)
        return bool(sync((arr.store_path / key).exists()))

    def _chunking(self, path: str) -> tuple[int, int]:
        """``(chunk rows, inner rows)``; zarr works out ``chunks`` of a sharded array on every call."""
        rows = self._rows.get(path)
        if rows is None:
            arr = self._array(path)
            rows = self._rows[path] = (int((arr.shards or arr.chunks)[0]), int(arr.chunks[0]))
        return rows

    def inner_rows(self, path: str) -> int:
        return self._chunking(path)[1]

    def gather(self, path: str, rows: np.ndarray, required: np.ndarray) -> np.ndarray | None:
        layout = self._layout(path)
        return None if layout is None else self._shards.gather(path, self._array(path), layout, rows, required)

    def chunk(self, path: str, chunk: int, required: bool) -> np.ndarray | None:
        layout = self._layout(path)
        return None if layout is None else self._shards.chunk(path, self._array(path), layout, chunk, required)

    def chunk_grids(self, path: str, chunks: np.ndarray) -> tuple[list[np.ndarray], np.ndarray, np.ndarray] | None:
        layout = self._layout(path)
        return None if layout is None else self._shards.chunk_grids(path, self._array(path), layout, chunks)

    def revalidate(self, path: str) -> None:
        self._shards.revalidate(path)

    @property
    def fresh_reads(self) -> int:
        """How many reads so far met files anew (zarr reads, shard files mapped or read): a reader
        that has not met any since it looked at the metadata has read nothing another writer made."""
        return self._fresh[0]

    def read_chunks(self, path: str, chunks: np.ndarray, required: np.ndarray) -> list[np.ndarray]:
        self._fresh[0] += 1
        layout = self._layout(path)
        if layout is not None:
            return self._shards.read(path, self._array(path), layout, chunks, required)
        per, n = self.inner_rows(path), self.shape(path)[0]
        out = []
        for chunk, needed in zip(np.asarray(chunks).tolist(), np.asarray(required).tolist()):
            if needed and self._array(path).shards is None and not self.chunk_written(path, chunk):
                raise ChunkFault(chunk, missing=True)
            try:
                out.append(self.read(path, chunk * per, min(n, (chunk + 1) * per)))
            except Exception as err:  # checksum and decode failures surface as codec errors
                raise ChunkFault(chunk, missing=False, cause=err) from err
        return out

    def shape(self, path: str) -> tuple[int, ...]:
        return tuple(self._array(path).shape)

    def dtype(self, path: str) -> str:
        dt = self._array(path).dtype
        return STRING if dt.kind in "OTU" else str(dt)

    def chunk_rows(self, path: str) -> int:
        return self._chunking(path)[0]

    def read(self, path: str, start: int, stop: int) -> np.ndarray:
        self._fresh[0] += 1
        plain = self._plain_layout(path)
        if plain is not None and stop > start:
            return plain.read(start, stop)
        arr = self._array(path)
        data = arr[start:stop]
        return as_str_array(data) if arr.dtype.kind in "OTU" else np.asarray(data)

    def write(self, path: str, start: int, data: np.ndarray, changed: np.ndarray | None = None) -> None:
        arr = self._array(path)
        if arr.dtype.kind in "OTU":
            data = np.asarray(data, dtype=object)
        layout = self._layout(path) if arr.shards is not None else None
        if layout is not None and layout.whole_shards(start, len(data), arr.shape[0]):
            if changed is None:
                self._shards.write(path, arr, layout, start, np.asarray(data))
            else:
                self._write_changed(path, arr, layout, start, np.asarray(data), np.asarray(changed, dtype=bool))
            return
        if path not in self._writers:
            self._writers[path] = ChunkWriter.of(arr)
        if self._writers[path] is not None and self._writers[path].write(start, np.asarray(data)):
            return  # whole plain chunks, written as files
        self._shards.forget(path)  # zarr rewrites the shards it touches: their indexes change
        arr[start:start + len(data)] = data

    def _write_changed(self, path: str, arr: zarr.Array, layout: ShardLayout, start: int, data: np.ndarray,
                       changed: np.ndarray) -> None:
        """Whole shards of which only the ``changed`` rows differ from what is stored: each shard the
        store laid out is patched (its changed inner chunks, ``_shard_patch``), any other written whole."""
        for lo in range(0, len(data), layout.shard_rows):
            shard, block = (start + lo) // layout.shard_rows, data[lo:lo + layout.shard_rows]
            if not patch_shard(arr, layout, shard, block, changed[lo:lo + layout.shard_rows]):
                self._shards.write(path, arr, layout, start + lo, block)
        self._shards.revalidate(path)  # patched files replace what is mapped (their indexes are the same)

    def resize(self, path: str, n_rows: int) -> None:
        arr = self._array(path)
        shape = (n_rows,) + tuple(arr.shape[1:])
        if self._nodes is not None and n_rows >= arr.shape[0]:  # zarr deletes chunks only to shrink
            metadata = arr.metadata.update_shape(shape)
            self._nodes.update_metadata(path, metadata)
            self.forget(path)  # the layout and cached rows hold the old shape
            self._keep(path, metadata)
            return
        if n_rows < arr.shape[0]:
            self._clear_cut_rows(path, arr, n_rows)
        arr.resize(shape)
        self.forget(path)  # the cached array object and layout hold the old shape

    def _clear_cut_rows(self, path: str, arr: zarr.Array, n_rows: int) -> None:
        """Fill values over the rows past ``n_rows`` of the chunk (shard) that keeps the new last row.

        zarr's resize deletes only the chunks wholly past the new end and keeps that one as it is;
        growing again (metadata only) would then show its cut rows anew: an append after a roll back
        would find the done flags and values written past the old end as its new clips' own."""
        per = self.chunk_rows(path)
        stop = min(int(arr.shape[0]), -(-n_rows // per) * per)
        if stop > n_rows and self.chunk_written(path, n_rows // per):
            self._shards.forget(path)  # zarr rewrites the shard: its index changes
            arr[n_rows:stop] = arr.metadata.fill_value

    def delete(self, path: str) -> None:
        self.forget(path)
        parent, _, name = path.rpartition("/")
        del self._node(parent)[name]

    def close(self) -> None:
        self._arrays.clear()
        self._layouts.clear()
        self._rows.clear()
        self._plain.clear()
        self._writers.clear()
        self._shards.forget("")
