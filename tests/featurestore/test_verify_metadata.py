"""``featurestore verify`` on a Zarr store whose ``zarr.json`` files are damaged (truncated, JSON of
the wrong shape, missing keys): each is a problem naming the file (exit 1, not a one-line error with
exit 2), and the rest of the store is still checked: a corrupt chunk in another feature set is found
beside it. Before, zarr's listing of the damaged node's parent stopped verify at the first one.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from featurestore import create_store
from featurestore.cli import main

from tests.featurestore.chunk_paths import chunk_file
from tests.featurestore.test_store import DIM, FEAT, N_SEG, features, make_manifest, provenance

OTHER = "logmel"
DAMAGE = {
    "not JSON": ('{"zarr_format": 3, "node_', "not valid JSON"),
    "a list": ("[1, 2]", "holds a JSON list"),
    "no data_type": ('{"zarr_format": 3, "node_type": "array", "shape": [3]}', "not a valid Zarr v3 array"),
}
NODES = ["features/clip/ViT-B-32/data", "features/clip/ViT-B-32/done", "features/clip/ViT-B-32", "features/clip",
         "index/city", ""]


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("verify_meta") / "whole.zarr"
    with create_store(path, make_manifest(8)) as store:
        for name in (FEAT, OTHER):
            store.create_feature_set(name, N_SEG, (DIM,), provenance(encoder=f"{name}@none"), chunk_clips=4)
            store.write_rows(name, 0, features(8))
    return path


def _flip_a_byte(path: Path) -> None:
    chunk = chunk_file(path, f"features/{OTHER}/data")  # rows 0:4
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))


@pytest.mark.parametrize("node", NODES)
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_metadata_is_a_problem_naming_the_file_and_the_rest_is_checked(whole, tmp_path, capsys, node, damage):
    store = tmp_path / "s.zarr"
    shutil.copytree(whole, store)
    text, what = DAMAGE[damage]
    (store / node / "zarr.json").write_text(text)
    _flip_a_byte(store)
    code = main(["verify", str(store)])
    out, err = capsys.readouterr()
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM ")]
    assert code == 1 and not err.strip(), (out, err)
    named = "zarr.json" if node == "" else f"{node}/zarr.json"
    assert any(line.startswith(f"PROBLEM {named}: ") and what in line for line in problems), out
    if node:  # the store opens: the other feature set's damaged chunk is found too
        assert any(line.startswith(f"PROBLEM features/{OTHER}/data rows 0:") for line in problems), out


def test_a_whole_store_reports_no_metadata_problem(whole, capsys):
    assert main(["verify", str(whole)]) == 0
    assert "PROBLEM" not in capsys.readouterr().out
