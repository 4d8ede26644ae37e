"""Zarr and HDF5 hold the same store: built alike they read alike, and convert_store keeps everything.

Also the fsspec ``memory://`` URL backend (the path remote stores such as s3:// take).
"""
from __future__ import annotations

import uuid
from typing import Any

import h5py
import numpy as np
import pytest

from featurestore import TAU_CLASSES, ClipRecord, Manifest, convert_store, create_store, open_store
from featurestore.store import backend_for

N_CLIPS, N_SEG, DIM, CHUNK = 14, 2, 3, 4


def manifest() -> Manifest:
    clips = [ClipRecord(f"{TAU_CLASSES[i % 10]}-milan-{i % 4}-{i}", label=None if i == 0 else TAU_CLASSES[i % 10],
                        city="milan", location=f"milan-{i % 4}", audio=None,
                        splits=frozenset({"fold1_train" if i % 4 else "fold1_evaluate"})) for i in range(N_CLIPS)]
    return Manifest("toy", list(TAU_CLASSES), clips)


def fill(location: str, backend: str | None = None) -> None:
    """Every kind of content: two feature sets (one nested, one failed clip), class features, a run."""
    rng = np.random.default_rng(0)
    prov = {"encoder": "timm/test_vit@none", "config": {"size": 32}, "weights": {"kind": "random", "seed": 3},
            "segments": {"frames": N_SEG}, "runtime": {"host": "h"}}
    with create_store(location, manifest(), backend=backend) as store:
        store.create_feature_set("timm/test_vit", N_SEG, (DIM,), prov, chunk_clips=CHUNK)
        store.write_rows("timm/test_vit", 0, rng.standard_normal((8, N_SEG, DIM)))
        store.set_errors("timm/test_vit", {9: "video stream missing"})
        store.create_feature_set("logmel", N_SEG, (2, 5), {**prov, "encoder": "logmel"}, dtype="float32")
        store.write_rows("logmel", 0, rng.standard_normal((N_CLIPS, N_SEG, 2, 5)))
        store.write_class_features("cliptext/RN50", rng.standard_normal((10, 4)).astype(np.float32),
                                   {**prov, "encoder": "cliptext/RN50@none"}, prompts=["a {} scene"])
        store.create_predictions("late_fusion/s0", N_SEG, {"head": {"name": "late_fusion", "lr": 0.01}})
        store.write_predictions("late_fusion/s0", [1, 2, 5], rng.dirichlet(np.ones(10), size=(3, N_SEG)))


def snapshot(location: str, keep_runtime: bool = True) -> dict[str, Any]:
    """Everything a user can read from a store, as plain Python data (so == compares it all)."""
    def prov(p: dict) -> dict:
        # runtime and data_version identify one creation (time, host, a random token)
        return p if keep_runtime else {k: v for k, v in p.items() if k not in ("runtime", "data_version")}

    with open_store(location, "r") as store:
        snap: dict[str, Any] = {"attrs": store.attrs, "clip_ids": store.clip_ids, "splits": store.splits(),
                                "columns": {c: (store.column(c).dtype.kind, store.column(c).tolist())
                                            for c in store.columns()}}
        for name, info in store.feature_sets().items():
            done = [store.clip_ids[i] for i in np.flatnonzero(store.done_mask(name))]
            snap[f"features/{name}"] = {
                "shape": info.shape, "dtype": info.dtype, "chunk_clips": info.chunk_clips,
                "provenance": prov(info.provenance), "fingerprint": info.fingerprint, "done": done,
                "errors": store.errors(name), "data": store.get_many(name, done).tolist()}
        for name in store.class_feature_sets():
            data, attrs = store.get_class_features(name)
            snap[f"class_features/{name}"] = (data.dtype.str, data.tolist(), attrs["prompts"],
                                              prov(attrs["provenance"]), attrs["fingerprint"])
        for run, attrs in store.prediction_runs().items():
            done = [store.clip_ids[i] for i in np.flatnonzero(store.prediction_done(run))]
            snap[f"predictions/{run}"] = (prov(attrs), done, store.get_predictions(run, done).tolist())
    return snap


def test_zarr_and_hdf5_read_alike(tmp_path):
    fill(str(tmp_path / "a.zarr"))
    fill(str(tmp_path / "a.h5"))
    zarr_snap = snapshot(str(tmp_path / "a.zarr"), keep_runtime=False)
    h5_snap = snapshot(str(tmp_path / "a.h5"), keep_runtime=False)
    assert zarr_snap == h5_snap
    assert zarr_snap["features/timm/test_vit"]["errors"] == {manifest().clip_ids[9]: "video stream missing"}
    assert len(zarr_snap["features/timm/test_vit"]["done"]) == 8
    assert zarr_snap["columns"]["label"][1][0] == -1


@pytest.mark.parametrize("first,second", [("s.zarr", "s.h5"), ("s.h5", "s.zarr")])
def test_convert_both_ways_keeps_everything(tmp_path, first, second):
    src, dst, back = (str(tmp_path / n) for n in (first, second, "back_" + first))
    fill(src)
    original = snapshot(src)
    assert convert_store(src, dst, progress=False) > 10
    assert snapshot(dst) == original
    convert_store(dst, back, progress=False)
    assert snapshot(back) == original
    with open_store(back, "a") as store:  # a converted store is a working store: verify, append, resume
        assert store.verify().ok
        info = store.create_feature_set("timm/test_vit", N_SEG, (DIM,),
                                        original["features/timm/test_vit"]["provenance"], chunk_clips=CHUNK)
        assert info.n_done == 8


def test_memory_url_create_write_read(tmp_path):
    url = f"memory://avscene-test-{uuid.uuid4().hex}/store.zarr"
    fill(url)
    with open_store(url, "r") as store:
        assert store.n_clips == N_CLIPS
        assert store.feature_sets()["timm/test_vit"].n_done == 8
        assert store.get("logmel", store.clip_ids[3]).shape == (N_SEG, 2, 5)
        assert store.verify().ok
    convert_store(url, str(tmp_path / "from_memory.h5"), progress=False)
    assert snapshot(str(tmp_path / "from_memory.h5")) == snapshot(url)


# --------------------------------------------------------------------------- choosing the backend
def test_hdf5_store_at_a_path_without_h5_suffix_reopens_as_hdf5(tmp_path):
    """A store created with backend='hdf5' under any name is recognised by its contents when reopened."""
    path = str(tmp_path / "store")
    fill(path, backend="hdf5")
    assert backend_for(path) == "hdf5"
    with open_store(path, "r") as store:
        assert store.backend == "hdf5" and store.n_clips == N_CLIPS
        assert store.feature_sets()["timm/test_vit"].n_done == 8
        assert store.verify().ok
    with open_store(path, "a") as store:  # writable too, without saying backend= again
        store.set_errors("logmel", {0: "decode failed"})
    convert_store(path, str(tmp_path / "copy.zarr"), progress=False)
    with open_store(str(tmp_path / "copy.zarr")) as copy:
        assert copy.backend == "zarr" and copy.errors("logmel") == {manifest().clip_ids[0]: "decode failed"}


def test_backend_for_new_and_existing_locations(tmp_path):
    # new stores: the explicit backend, else the name; URLs are Zarr
    assert backend_for(tmp_path / "a.h5") == backend_for(tmp_path / "a.HDF5") == "hdf5"
    assert backend_for(tmp_path / "a.zarr") == backend_for(tmp_path / "a") == "zarr"
    assert backend_for(tmp_path / "a", "hdf5") == "hdf5" and backend_for(tmp_path / "a.h5", "zarr") == "zarr"
    assert backend_for("memory://x/a.h5") == backend_for("s3://bucket/store") == "zarr"
    with pytest.raises(ValueError, match="unknown backend 'lmdb'"):
        backend_for(tmp_path / "a", "lmdb")
    # existing stores: their contents, whatever their name
    fill(str(tmp_path / "looks_like.h5"), backend="zarr")
    fill(str(tmp_path / "looks_like.zarr"), backend="hdf5")
    assert backend_for(tmp_path / "looks_like.h5") == "zarr"
    assert backend_for(tmp_path / "looks_like.zarr") == "hdf5"
    with open_store(tmp_path / "looks_like.zarr") as store:
        assert store.backend == "hdf5"
    with pytest.raises(ValueError, match="is a HDF5 file, not a zarr store"):
        open_store(tmp_path / "looks_like.zarr", "r", backend="zarr")
    # being written anew (mode "w", a conversion's destination): what is there does not count
    assert backend_for(tmp_path / "looks_like.h5", new=True) == "hdf5"
    # an HDF5 file with a user block has its signature at 512 (or 1024, 2048, ...)
    with h5py.File(tmp_path / "userblock", "w", userblock_size=1024) as f:
        f["x"] = np.arange(3)
    assert backend_for(tmp_path / "userblock") == "hdf5"
    (tmp_path / "notes.txt").write_text("not a store")
    assert backend_for(tmp_path / "notes.txt") == "zarr"  # nothing recognisable: the name decides
