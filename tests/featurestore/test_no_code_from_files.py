"""Store and checkpoint files from elsewhere are data, never code.

A pickle payload (an object whose ``__reduce__`` writes a marker file) is planted in a Zarr store's
``zarr.json`` attributes (base64 text, latin-1 text of the pickle bytes) and in an HDF5 store's
attributes (opaque bytes, an object array of bytes, a bytes string); opening the store, ``ls``,
``show``, ``verify``, ``get`` and reading features must never run it. Heads' checkpoints are read
with safetensors and JSON only, so a pickle where a checkpoint is expected is not unpickled.
"""
from __future__ import annotations

import base64
import json
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

from featurestore import TAU_CLASSES, ClipRecord, Manifest, create_store, open_store
from featurestore.cli import main

FEAT = "timm/x"


class _Payload:
    """Unpickling this runs ``exec``, which writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _live_payload(marker: Path) -> bytes:
    """The pickle bytes; checked to be live (a plain ``pickle.loads`` writes the marker)."""
    blob = pickle.dumps(_Payload(marker))
    pickle.loads(blob)
    assert marker.exists()
    marker.unlink()
    return blob


def _build(path: Path) -> list[str]:
    clips = [ClipRecord(f"{TAU_CLASSES[i]}-oslo-{i}-{i}", label=TAU_CLASSES[i], city="oslo", location=f"oslo-{i}")
             for i in range(4)]
    prov = {"encoder": "timm/x@none", "config": {}, "weights": {"kind": "random", "seed": 0}}
    with create_store(str(path), Manifest("toy", list(TAU_CLASSES), clips)) as store:
        store.create_feature_set(FEAT, 1, (3,), prov, chunk_clips=2)
        store.write_rows(FEAT, 0, np.ones((4, 1, 3), np.float16))
        return store.clip_ids


def _plant_zarr(path: Path, blob: bytes, marker: Path) -> None:
    text = {"b64": base64.b64encode(blob).decode(), "latin1": blob.decode("latin-1")}
    for meta in (path / "zarr.json", path / "features" / FEAT / "zarr.json", path / "index" / "clip_id" / "zarr.json"):
        doc = json.loads(meta.read_text())
        doc.setdefault("attributes", {}).update({"payload_b64": text["b64"], "payload_pickle": text["latin1"],
                                                 "payload_obj": {"__pickle__": text["b64"], "py/reduce": text["b64"]}})
        meta.write_text(json.dumps(doc))


def _plant_hdf5(path: Path, blob: bytes, marker: Path) -> None:
    text = pickle.dumps(_Payload(marker), protocol=0)  # ASCII: fits a variable-length string
    with h5py.File(path, "a") as f:
        for node in (f, f[f"features/{FEAT}"], f["index/clip_id"]):
            node.attrs["payload_opaque"] = np.void(blob)
            node.attrs["payload_objects"] = np.array([text, text], dtype=object)  # protocol 0: no NUL bytes
            node.attrs["payload_bytes"] = np.bytes_(blob)


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_planted_pickles_in_store_attributes_never_run(backend, tmp_path, capsys) -> None:
    marker = tmp_path / "marker.txt"
    blob = _live_payload(marker)
    path = tmp_path / ("s.zarr" if backend == "zarr" else "s.h5")
    ids = _build(path)
    (_plant_zarr if backend == "zarr" else _plant_hdf5)(path, blob, marker)

    with open_store(str(path)) as store:
        values = [store.attrs, *(info.provenance for info in store.feature_sets().values())]
        assert store.get(FEAT, ids[1]).shape == (1, 3)
        assert store.get_many(FEAT, ids).shape == (4, 1, 3)
        store.verify()
    flat = [v for attrs in values for v in attrs.values()] + list(values)
    assert not any(isinstance(v, _Payload) for v in flat)
    for argv in (["ls", str(path)], ["ls", str(path), "--json"], ["show", str(path), ids[0]],
                 ["show", str(path), ids[0], "--json"], ["verify", str(path)],
                 ["get", str(path), FEAT, ids[0], "-o", str(tmp_path / "x.npy")]):
        code = main(argv)
        out, err = capsys.readouterr()
        assert code in (0, 1, 2), argv
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, (argv, err)
    assert not marker.exists()


def test_heads_checkpoints_are_safetensors_and_json_only(tmp_path) -> None:
    from heads.checkpoint import CheckpointError, load_weights, read_json, run_file

    marker = tmp_path / "marker.txt"
    blob = _live_payload(marker)
    for name in ("best.safetensors", "evil.pt"):  # a pickle under the checkpoint's name and beside it
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(CheckpointError, match=f"{name}' is not a readable safetensors file"):
            load_weights(tmp_path / name)
        assert not marker.exists()
    (tmp_path / "state.json").write_bytes(blob)
    with pytest.raises(ValueError):
        read_json(tmp_path / "state.json")
    assert not marker.exists()
    import heads

    sources = "\n".join(p.read_text() for p in Path(heads.__file__).parent.glob("*.py"))
    assert "torch.load(" not in sources and "pickle.load" not in sources and "allow_pickle=True" not in sources
    for outside in ("../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors"):
        with pytest.raises(CheckpointError, match="outside the run directory"):
            run_file(tmp_path, outside)
    assert run_file(tmp_path, "epoch_003.safetensors") == (tmp_path / "epoch_003.safetensors").resolve()
