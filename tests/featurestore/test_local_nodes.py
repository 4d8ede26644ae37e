"""New nodes of a local Zarr store are written as zarr-python writes them (``_local_nodes``).

The store writes a new group's or array's ``zarr.json`` itself instead of through zarr's event loop;
these tests hold it to zarr's own output: the same metadata for every kind of array the store
makes, parents made where missing, an array replacing what was at its path, and the result read back
by zarr-python itself.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from featurestore.errors import StoreFormatError
from featurestore.store._backend import STRING
from featurestore.store._zarr import ZarrBackend

KINDS = {  # (shape, dtype, chunk rows, fill, compressor, inner rows): what the store creates
    "numbers": ((10, 3), "float16", 4, 0, None, None),
    "flags": ((10,), "bool", 4, False, None, None),
    "strings": ((10,), STRING, 4, "", None, None),
    "sharded": ((64, 2, 8), "float16", 16, 0, None, 4),
    "sharded zstd": ((64, 8), "uint8", 16, 0, "zstd", 4),
    "table": ((7, 3), "uint64", 8, 0, None, 4),
}


def _zarr_json(root: Path, path: str) -> dict:
    return json.loads((root / path / "zarr.json").read_text())


def _pair(tmp_path) -> tuple[ZarrBackend, ZarrBackend]:
    """A backend writing nodes directly, and one made to go through zarr (no local node writer)."""
    direct, through = ZarrBackend(str(tmp_path / "direct.zarr"), "w"), ZarrBackend(str(tmp_path / "zarr.zarr"), "w")
    assert direct._nodes is not None
    through._nodes = None
    return direct, through


def _create(backend: ZarrBackend, path: str, kind: str, shape: tuple | None = None) -> None:
    """An array of ``kind`` (``KINDS``) at ``path``, of its own shape or ``shape``."""
    default, dtype, rows, fill, compressor, inner = KINDS[kind]
    backend.create_array(path, shape or default, dtype, rows, fill, compressor=compressor, inner_rows=inner)


def _same_json(tmp_path, path: str) -> dict:
    """The metadata of ``path``, which both stores of ``_pair`` must hold alike."""
    direct = _zarr_json(tmp_path / "direct.zarr", path)
    assert direct == _zarr_json(tmp_path / "zarr.zarr", path)
    return direct


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_an_array_has_the_metadata_zarr_writes(tmp_path, kind):
    for backend in _pair(tmp_path):
        _create(backend, "features/a/b/data", kind)
    _same_json(tmp_path, "features/a/b/data")
    for parent in ("features", "features/a", "features/a/b"):  # made as zarr makes them
        assert _same_json(tmp_path, parent)["node_type"] == "group"


def test_written_values_read_back_through_zarr_python(tmp_path):
    direct, _ = _pair(tmp_path)
    values = np.arange(64 * 8, dtype=np.float16).reshape(64, 1, 8)
    direct.create_group("features")
    direct.create_array("features/emb", values.shape, "float16", 16, 0, inner_rows=4)
    direct.write("features/emb", 0, values)
    direct.create_array("index/clip_id", (3,), STRING, 4, "")
    direct.write("index/clip_id", 0, np.array(["a", "é", "c"], dtype=object))
    root = zarr.open_group(str(tmp_path / "direct.zarr"), mode="r")
    assert np.array_equal(root["features/emb"][:], values)
    assert root["index/clip_id"][:].tolist() == ["a", "é", "c"]
    assert sorted(name for name, _ in root.members(max_depth=None)) == ["features", "features/emb", "index",
                                                                        "index/clip_id"]


def test_an_array_replaces_the_node_and_chunks_at_its_path(tmp_path):
    direct, _ = _pair(tmp_path)
    root = tmp_path / "direct.zarr"
    direct.create_array("x", (8,), "int16", 4, -1)
    direct.write("x", 0, np.arange(8, dtype=np.int16))
    assert sorted(p.name for p in (root / "x").iterdir()) == ["c.0", "c.1", "zarr.json"]
    direct.create_array("x", (6, 2), "float32", 3, 0)
    assert sorted(p.name for p in (root / "x").iterdir()) == ["zarr.json"]  # old chunks gone with it
    assert _zarr_json(root, "x")["shape"] == [6, 2]
    assert direct.read("x", 0, 6).tolist() == [[0, 0]] * 6
    direct.create_group("g/h")
    direct.create_array("g", (2,), "int16", 2, 0)  # over a group: the group and what is under it go
    assert not (root / "g" / "h").exists() and _zarr_json(root, "g")["node_type"] == "array"


def test_a_group_that_exists_is_left_as_it_is(tmp_path):
    direct, _ = _pair(tmp_path)
    direct.create_group("g")
    direct.set_attrs("g", {"kept": 1})
    direct.create_group("g")
    assert direct.get_attrs("g") == {"kept": 1}


def test_no_temp_file_is_left_beside_the_metadata(tmp_path):
    direct, _ = _pair(tmp_path)
    direct.create_array("a/b/c", (4,), "int16", 2, 0)
    direct.create_group("d/e")
    assert not list((tmp_path / "direct.zarr").rglob("*.partial"))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_second_array_of_a_kind_has_the_metadata_zarr_writes_for_its_shape(tmp_path, kind):
    """zarr builds a kind's metadata once; the next array of that kind (another shape) takes it over."""
    shape = KINDS[kind][0]
    other = (shape[0] * 3 + 5, *shape[1:])
    direct, through = _pair(tmp_path)
    for backend in (direct, through):
        _create(backend, "first", kind)
        _create(backend, "second", kind, other)
    assert len(direct._nodes._kinds) == 1
    assert _same_json(tmp_path, "second")["shape"] == list(other)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_growing_array_has_the_metadata_zarr_writes_and_a_shrinking_one_loses_its_chunks(tmp_path, kind):
    shape, dtype, rows = KINDS[kind][:3]
    direct, through = _pair(tmp_path)
    for backend in (direct, through):
        _create(backend, "a", kind)
        backend.resize("a", shape[0] * 4)
    _same_json(tmp_path, "a")
    assert direct.shape("a") == (shape[0] * 4, *shape[1:])
    values = np.full((shape[0] * 4, *shape[1:]), "x", dtype=object) if dtype == STRING \
        else np.ones((shape[0] * 4, *shape[1:]), dtype=dtype)
    direct.write("a", 0, values)
    chunks = sorted(p.name for p in (tmp_path / "direct.zarr" / "a").iterdir() if p.name != "zarr.json")
    direct.resize("a", rows)  # shrinking: zarr deletes the chunks past the end
    assert sorted(p.name for p in (tmp_path / "direct.zarr" / "a").iterdir() if p.name != "zarr.json") == chunks[:1]
    assert direct.shape("a")[0] == rows
    root = zarr.open_group(str(tmp_path / "direct.zarr"), mode="r")
    assert root["a"].shape[0] == rows


def test_a_local_stores_nodes_are_looked_up_in_its_folder_not_through_zarr(tmp_path, monkeypatch):
    """exists, is_array and children of a local store read the zarr.json files (zarr's event loop took
    0.3-4 ms a lookup); they answer as zarr does, and a damaged child is named."""
    direct, _ = _pair(tmp_path)
    direct.create_array("index/clip_id", (3,), STRING, 4, "")
    direct.create_group("features/emb")
    direct.create_array("features/emb/data", (3, 2), "float16", 2, 0)
    reader = ZarrBackend(str(tmp_path / "direct.zarr"), "r")

    def refused(*args, **kwargs):
        raise AssertionError("looked up through zarr")

    monkeypatch.setattr(zarr.Group, "__getitem__", refused)
    monkeypatch.setattr(zarr.Group, "members", refused)
    for backend in (direct, reader):
        assert backend.exists("index") and backend.exists("index/clip_id") and not backend.exists("predictions")
        assert backend.children("") == ["features", "index"] and backend.children("features") == ["emb"]
        assert not backend.is_array("features/emb") and not backend.is_array("nothing")
    monkeypatch.undo()
    assert reader.is_array("features/emb/data") and reader.read("features/emb/data", 0, 3).shape == (3, 2)
    (tmp_path / "direct.zarr" / "features" / "emb" / "zarr.json").write_text("[]")
    with pytest.raises(StoreFormatError, match="features/emb/zarr.json"):
        reader.children("features")
