"""A store named through a symbolic link takes the same writer lock as its real path (before: two
lock files, so an extraction through the link and one through the real path wrote at once)."""
from __future__ import annotations

import pytest

from featurestore.store.lock import StoreLockedError, lock_path, writer_lock


def test_a_link_to_a_store_takes_the_stores_own_lock(tmp_path):
    real = tmp_path / "scratch" / "store.zarr"
    real.mkdir(parents=True)
    link = tmp_path / "store.zarr"
    link.symlink_to(real)
    assert lock_path(link) == lock_path(real) == real.parent / "store.zarr.lock"
    with writer_lock(real):
        with pytest.raises(StoreLockedError, match="is being written by another process"):
            writer_lock(link).acquire()
    with writer_lock(link):
        with pytest.raises(StoreLockedError):
            writer_lock(real).acquire()
    assert not (real.parent / "store.zarr.lock").exists() and not (tmp_path / "store.zarr.lock").exists()
