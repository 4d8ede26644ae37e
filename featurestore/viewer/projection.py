"""The embedding map's 2-D coordinates: computed once per feature set state, kept in a sidecar file.

The coordinates of a set are a cache keyed like search's sidecars (`featurestore.store.search`):
the set's fingerprint, shape, done mask and data version, plus the method. A set that gains clips or
is rewritten gets a new key, so the old file is never served; the file is found by that key and
checked against the sha256 its name carries before a byte of it is decoded (the same no-follow,
hash-named files as search, `featurestore.store._search_files`). It lives in
``<store>.view/<feature set>/`` and is the only thing the viewer writes. A store this process cannot
write (a read-only mount) gets no file: the projection is computed in memory on every start.

Clips are projected from the vectors search uses (the L2-normalised mean over segments), so the
map's neighbourhoods are the neighbours the clip page lists.
"""
from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.errors import FeatureStoreError
from featurestore.store import _search_files as files
from featurestore.store._search_files import SidecarDamage, SidecarDir
from featurestore.store.search import clip_blocks, set_state
from featurestore.store.shared import write_problem

METHODS = ("pca", "umap")
#: Rows per block of the covariance pass: 16,384 x 512 float32 is a 32 MiB temporary.
BLOCK_ROWS = 16_384
SIDECAR_SUFFIX = ".view"
FILE_SUFFIX = ".npz"


class ProjectionUnavailable(FeatureStoreError, ImportError):
    """The projection asked for needs a package that is not installed (a usage error: one line)."""


@dataclass
class Projection:
    """``xy[i]`` is the map position of store row ``rows[i]`` (the set's done clips, rows increasing)."""

    feature_set: str
    method: str
    key: str
    rows: np.ndarray
    xy: np.ndarray
    seconds: float = 0.0  # time spent computing it (0 when read from the sidecar)
    kept_in: Path | None = None  # the sidecar file, when there is one


def project(store: Any, feature_set: str, method: str = "pca", keep: bool = True, seed: int = 0) -> Projection:
    """The set's 2-D projection: from its sidecar when one matches the set's state, else computed.

    Args:
        store: an open `FeatureStore`.
        feature_set: an embedding set (one vector per segment).
        method: ``pca`` (scikit-learn) or ``umap`` (needs ``umap-learn``).
        keep: write the sidecar when it was computed (never on a store this process cannot write).
        seed: UMAP's random state (PCA is exact: no randomness).

    Raises:
        UnknownFeatureError, ValueError: a set that is not one vector per segment, or no done clip.
        ProjectionUnavailable: ``umap`` without ``umap-learn``.
    """
    if method not in METHODS:
        raise ValueError(f"projection method must be one of {', '.join(METHODS)}, got {method!r}")
    state = set_state(store, feature_set)
    if len(state.info.feature_shape) != 1:
        raise ValueError(f"feature set {feature_set!r} holds {list(state.info.feature_shape)} arrays per segment; "
                         f"the map needs one embedding vector per segment")
    key = state.key(f"view-{method}" + ("-eigh" if method == "pca" else ""))  # -eigh: exact PCA (a sampled fit before)
    place = _place(store, feature_set) if keep else None
    with _folder(place) as folder:
        found = _load(folder, key, store.done_mask(feature_set), state.origin)
        if found is not None:
            name, rows, xy = found
            return Projection(feature_set, method, key, rows, xy, 0.0, folder.path / name)
        t0 = time.perf_counter()
        rows, xy = compute(store, feature_set, method, seed)
        seconds = time.perf_counter() - t0
        saved = _save(folder, key, rows, xy, state.origin)
        return Projection(feature_set, method, key, rows, xy, seconds, saved)


def compute(store: Any, feature_set: str, method: str = "pca", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(rows, xy float32) of the set's done clips, projected now."""
    blocks = list(clip_blocks(store, feature_set))
    if not blocks:
        raise ValueError(f"feature set {feature_set!r} has no finished clip to put on the map")
    rows = np.concatenate([r for r, _ in blocks])
    vectors = np.concatenate([v for _, v in blocks])
    del blocks
    return rows, project_vectors(vectors, method, seed)


def project_vectors(vectors: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """``[n, dim]`` -> ``[n, 2]`` float32 (one vector or one dimension: zeros beyond what exists).

    PCA is `pca_2d`: exact, numpy only."""
    n, dim = vectors.shape
    out = np.zeros((n, 2), dtype=np.float32)
    if n < 2 or dim < 1:
        return out
    if method == "umap":
        try:
            import umap
        except ImportError as err:
            raise ProjectionUnavailable("the umap projection needs umap-learn (not installed): pip install umap-learn, "
                                        "or use --method pca") from err
        out[:] = umap.UMAP(n_components=2, random_state=seed).fit_transform(vectors)
        return out
    k = min(2, n, dim)
    out[:, :k] = pca_2d(vectors, k)
    return out


def pca_2d(vectors: np.ndarray, k: int = 2) -> np.ndarray:
    """The ``k`` leading principal components of ``vectors`` ``[n, dim]`` (float32 ``[n, k]``).

    Exact PCA by the eigenvectors of the covariance matrix (``dim x dim``): products of float32 row
    blocks summed in float64, the mean's outer product taken off: scikit-learn's ``covariance_eigh`` solver, which its default
    picks for n >> dim, with its sign rule (each component's largest-magnitude entry positive). Done
    here rather than by scikit-learn because importing it costs the app seconds and ~100 MiB of
    memory it then keeps, and float32 blocks halve the pass's time and temporaries; at 100,000 x
    512 it is one read of the vectors and a 512 x 512 eigenproblem (scripts/bench/bench_view.py).
    """
    x = np.asarray(vectors)
    n, dim = x.shape
    mean, cov = np.zeros(dim, dtype=np.float64), np.zeros((dim, dim), dtype=np.float64)
    step = n if x.dtype == np.float32 else BLOCK_ROWS  # float32 already: one product, as scikit-learn (no copy)
    for start in range(0, n, step):  # sums and raw products (no centred copy)
        block = x[start:start + step].astype(np.float32, copy=False)
        mean += block.sum(axis=0, dtype=np.float64)
        cov += block.T @ block
    mean /= n
    cov -= n * np.outer(mean, mean)
    _, vecs = np.linalg.eigh(cov / max(1, n - 1))
    components = vecs[:, ::-1][:, :k].T  # [k, dim], largest variance first
    signs = np.sign(components[np.arange(k), np.abs(components).argmax(axis=1)])
    components = (components * np.where(signs == 0, 1, signs)[:, None]).astype(np.float32)
    out = np.empty((n, k), dtype=np.float32)
    shift = mean.astype(np.float32) @ components.T
    for start in range(0, n, BLOCK_ROWS):
        out[start:start + BLOCK_ROWS] = x[start:start + BLOCK_ROWS].astype(np.float32, copy=False) @ components.T - shift
    return out


# -------------------------------------------------------------------------------- the sidecar
def sidecar_dir(store: Any, feature_set: str) -> Path | None:
    """``<store path>.view/<feature set>/``; None for stores at URLs."""
    place = _place(store, feature_set)
    return None if place is None else place[0].joinpath(*place[1])


def _place(store: Any, feature_set: str) -> tuple[Path, list[str]] | None:
    """(the store's parent, the names below it), or None: a URL, or a store this process cannot write."""
    location = str(store.location)
    if "://" in location and not location.startswith("file://"):
        return None
    if write_problem(location) is not None:
        return None
    path = Path(location.removeprefix("file://").rstrip("/"))
    return path.parent, [path.name + SIDECAR_SUFFIX, *feature_set.split("/")]


@contextlib.contextmanager
def _folder(place: tuple[Path, list[str]] | None) -> Iterator[SidecarDir | None]:
    """The open sidecar directory, or None (no place, a link where a folder belongs, unwritable)."""
    with contextlib.ExitStack() as stack:
        folder = None
        if place is not None:
            with contextlib.suppress(OSError):
                folder = stack.enter_context(files.open_dir(*place))
        yield folder


def _load(folder: SidecarDir | None, key: str, done: np.ndarray,
          origin: dict[str, str | None]) -> tuple[str, np.ndarray, np.ndarray] | None:
    """(name, rows, xy) of the checked projection of ``key``; a damaged file, or one bound to another
    store, feature set or data version (copied and renamed by hand: its name's sha256 is still right),
    is removed and the projection recomputed."""
    if folder is None:
        return None
    for name in files.names(folder, key, FILE_SUFFIX):
        try:
            with files.open_checked(folder, name, int(done.sum()) * 16 + 4096 + files.BIND_MAX_BYTES) as f:
                end = files.check_binding(f, name, origin)
                return (name, *_decode(f.read(end), done))
        except SidecarDamage:
            files.remove(folder, name)
        except OSError:
            continue
    return None


def _decode(data: bytes, done: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The file's rows and coordinates, when they are done store rows each once, with finite positions."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as held:
            rows, xy = held["rows"], held["xy"]
    except (ValueError, KeyError, OSError) as err:
        raise SidecarDamage(f"not a projection file: {err}") from err
    if rows.dtype != np.int64 or rows.ndim != 1 or xy.dtype != np.float32 or xy.shape != (len(rows), 2) \
            or not np.isfinite(xy).all():
        raise SidecarDamage(f"rows {rows.dtype} {rows.shape} and xy {xy.dtype} {xy.shape} are not a projection")
    files.check_rows(rows, done)
    return rows, xy


def _save(folder: SidecarDir | None, key: str, rows: np.ndarray, xy: np.ndarray,
          origin: dict[str, str | None]) -> Path | None:
    """Keep the projection under ``key`` and drop the files of older keys; None when not written."""
    if folder is None:
        return None
    try:
        name = files.save(folder, key, FILE_SUFFIX,
                          lambda f: np.savez(f, rows=rows.astype(np.int64), xy=xy.astype(np.float32)), origin=origin)
    except OSError:
        return None
    files.remove_others(folder, FILE_SUFFIX, name)
    return folder.path / name
