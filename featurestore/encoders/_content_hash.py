"""Which weight files a library loaded, and their SHA-256, cached on disk by path, size and times.

A pretrained tag names weights, but the file behind it lies in a cache that can be replaced (a new
hub revision, a copied-over cache): two different files under one tag would give one fingerprint,
and a resume would mix their features in one feature set. So the file a library actually reads
while building a pretrained model is recorded (``torch.load`` / ``safetensors.torch.load_file``
are watched for the duration, in the calling thread only) and its content hash goes into the
provenance. Hashing a multi-GB checkpoint takes seconds, so hashes are kept in a small JSON file
(``$FEATURESTORE_HASH_CACHE``, default ``$XDG_CACHE_HOME/featurestore/sha256.json``) keyed by
resolved path, size, mtime, ctime and inode: a replaced or rewritten file changes at least one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from featurestore.encoders._patching import SharedPatch
from featurestore.provenance import file_sha256

HASH_CACHE_ENV = "FEATURESTORE_HASH_CACHE"
_MEMO: dict[str, str] = {}
_LOCAL = threading.local()


def hash_cache_path() -> Path:
    """Where cached hashes are kept (``$FEATURESTORE_HASH_CACHE`` or the user's cache directory)."""
    explicit = os.environ.get(HASH_CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "featurestore" / "sha256.json"


def _stat_key(path: Path) -> str:
    """``path|size|mtime_ns|ctime_ns|inode``: changes whenever the file is replaced or rewritten."""
    st = path.stat()
    return f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"


def cached_sha256(path: str | Path) -> str:
    """Hex SHA-256 of ``path``'s content, read from the hash cache when the file is unchanged.

    A cache that cannot be read or written (corrupt JSON, read-only home) is ignored: the hash
    is then computed each time, never guessed.
    """
    resolved = Path(path).expanduser().resolve()
    key = _stat_key(resolved)
    if key in _MEMO:
        return _MEMO[key]
    table = _read_cache()
    digest = table.get(key)
    if not (isinstance(digest, str) and len(digest) == 64):
        digest = file_sha256(resolved)
        table = {k: v for k, v in table.items()
                 if not k.startswith(f"{resolved}|") and os.path.exists(k.split("|", 1)[0])}
        table[key] = digest  # entries of this file's older versions and of deleted files go
        _write_cache(table)
    _MEMO[key] = digest
    return digest


def _read_cache() -> dict[str, Any]:
    try:
        table = json.loads(hash_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def _write_cache(table: dict[str, Any]) -> None:
    """Replace the cache file atomically (a concurrent reader sees the old or the new table)."""
    target = hash_cache_path()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".sha256-", suffix=".json")
        with os.fdopen(fd, "w") as handle:
            json.dump(table, handle, sort_keys=True)
        os.replace(tmp, target)
    except OSError:
        with contextlib.suppress(OSError, UnboundLocalError):
            os.unlink(tmp)


# ===================================================================== which files were loaded
@contextlib.contextmanager
def recording_loaded_files() -> Iterator[list[str]]:
    """Collect the paths this thread passes to ``torch.load`` / ``safetensors.torch.load_file``.

    timm and open_clip read pretrained weights through one of the two (``torch.hub`` too), by
    module attribute, so wrapping the attributes for the block sees the file actually read,
    whichever cache or source the library chose. Other threads are not recorded.
    """
    files: list[str] = []
    stack = getattr(_LOCAL, "stack", None) or []
    _LOCAL.stack = [*stack, files]
    try:
        with _WATCHING():
            yield files
    finally:
        _LOCAL.stack = stack


def _record(target: Any) -> None:
    stack = getattr(_LOCAL, "stack", None)
    if stack and isinstance(target, (str, os.PathLike)):
        stack[-1].append(os.fspath(target))


def _watched_loaders() -> list[tuple[Any, str, Any]]:
    import safetensors.torch

    return [(torch, "load", _watched(torch.load)),
            (safetensors.torch, "load_file", _watched(safetensors.torch.load_file))]


_WATCHING = SharedPatch(_watched_loaders)


def _watched(function: Any) -> Any:
    def watched(target: Any, *args: Any, **kwargs: Any) -> Any:
        _record(target)
        return function(target, *args, **kwargs)

    watched.__wrapped__ = function  # type: ignore[attr-defined]
    return watched


def loaded_weights_hash(files: list[str], module: torch.nn.Module) -> tuple[str, str]:
    """``(path, sha256)`` of the weights a pretrained build loaded.

    One file: its path and (cached) content hash. Several: the paths joined with ``;`` and the
    hash of their hashes. None seen (a library that reads weights some other way, e.g. numpy
    ``.npz``): the hash of the loaded tensors themselves, path ``(loaded tensors)``, so the
    weights are identified either way.
    """
    unique = list(dict.fromkeys(str(Path(f).expanduser().resolve()) for f in files))
    if not unique:
        return "(loaded tensors)", tensors_sha256(module)
    if len(unique) == 1:
        return files[0], cached_sha256(unique[0])
    joined = "\n".join(cached_sha256(f) for f in unique)
    return "; ".join(unique), hashlib.sha256(joined.encode()).hexdigest()


def tensors_sha256(module: torch.nn.Module) -> str:
    """SHA-256 over a module's state dict: names, dtypes, shapes and bytes, in key order."""
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{list(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
