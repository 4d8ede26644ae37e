"""Fixtures of the heads tests: a tiny real store (see ``_store.py``) and one torch thread per test."""
from __future__ import annotations

from pathlib import Path

import pytest

from featurestore.store import open_store

from tests.heads._store import build_store


@pytest.fixture(scope="session")
def tiny_store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_store(tmp_path_factory.mktemp("heads") / "tiny.zarr")


@pytest.fixture
def tiny_store(tiny_store_path: Path):
    store = open_store(tiny_store_path, mode="r")
    yield store
    store.close()


@pytest.fixture
def writable_store(tmp_path: Path):
    """A fresh store of its own (tests that write predictions or change feature sets)."""
    path = build_store(tmp_path / "own.zarr")
    store = open_store(path, mode="a")
    yield store
    store.close()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread, and the suite shares 2 cores: intra-op threads that wait for
    each other on a loaded machine slow these tests down many times over."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
