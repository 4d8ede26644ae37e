"""The ``featurestore`` command line through ``main([...])`` on real stores: output, JSON and exit codes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from featurestore import TAU_CLASSES, ClipRecord, Manifest, create_store, open_store
from featurestore.cli import main
from tests.featurestore.chunk_paths import chunk_file

N_CLIPS, N_SEG, DIM, CHUNK = 12, 2, 3, 4
FEAT = "clip/ViT-B-32"


def build(path: str, weights: dict | None = None) -> np.ndarray:
    """Clips 0-7 done, clip 9 failed, 8 and 10-11 not computed; class features; a prediction run."""
    clips = [ClipRecord(f"{TAU_CLASSES[i % 10]}-prague-{i}-{i}", label=TAU_CLASSES[i % 10], city="prague",
                        location=f"prague-{i}", video=Path(f"video/{TAU_CLASSES[i % 10]}-prague-{i}-{i}.mp4"),
                        splits=frozenset({"fold1_train" if i < 9 else "fold1_evaluate"})) for i in range(N_CLIPS)]
    data = np.random.default_rng(0).standard_normal((N_CLIPS, N_SEG, DIM)).astype(np.float16)
    prov = {"encoder": "clip/ViT-B-32@none", "config": {}, "weights": weights or {"kind": "random", "seed": 7},
            "segments": {"frames": N_SEG}}
    with create_store(path, Manifest("toy", list(TAU_CLASSES), clips)) as store:
        store.create_feature_set(FEAT, N_SEG, (DIM,), prov, chunk_clips=CHUNK)
        store.write_rows(FEAT, 0, data[:8])
        store.set_errors(FEAT, {9: "no video stream"})
        store.write_class_features("cliptext/ViT-B-32", np.ones((10, 4), np.float32), prov)
        store.create_predictions("zs/clip", N_SEG, {"head": "zero_shot"})
        probs = np.full((1, N_SEG, 10), 0.05, np.float32)
        probs[..., 4] = 0.55
        store.write_predictions("zs/clip", [1], probs)
    return data


@pytest.fixture(params=["zarr", "hdf5"])
def store_path(request, tmp_path):
    path = str(tmp_path / ("s.zarr" if request.param == "zarr" else "s.h5"))
    return path, build(path)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -------------------------------------------------------------------------------------------- ls
def test_ls_tables_and_random_weights_warning(store_path, capsys):
    path, _ = store_path
    code, out, _ = run(capsys, "ls", path)
    assert code == 0
    line = next(l for l in out.splitlines() if l.strip().startswith(FEAT))
    assert "12x2x3" in line and "float16" in line and "8/12" in line and "RANDOM(seed=7)" in line
    assert "RANDOM WEIGHTS" in line
    assert "WARNING: 2 set(s) were computed with RANDOM encoder weights" in out
    assert "fold1_evaluate (3), fold1_train (9)" in out
    assert "cliptext/ViT-B-32" in out and "zs/clip" in out and "1/12" in out


def test_ls_lists_datasets_added_after_the_first(store_path, capsys):
    path, _ = store_path
    assert "\nadded " not in run(capsys, "ls", path)[1]  # one dataset: nothing to add
    more = [ClipRecord(f"bus-oslo-{i}-{i}", label="bus", city="oslo", location=f"oslo-{i}") for i in range(3)]
    with open_store(path, "a") as store:
        store.append_clips(Manifest("batch2", list(TAU_CLASSES), more, root=Path("/data/batch2")))
    code, out, _ = run(capsys, "ls", path)
    assert code == 0 and "dataset 'toy'" in out
    assert "added     'toy' rows 0:12 (no root); 'batch2' rows 12:15 (/data/batch2)" in out


def test_a_reader_that_quits_is_no_error(store_path):
    """`featurestore ls STORE | head -1`: the closed pipe ends the command quietly, as in a shell."""
    path, _ = store_path
    proc = subprocess.Popen([sys.executable, "-m", "featurestore", "ls", path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader quits before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and err == ""


def test_ls_json(store_path, capsys):
    path, _ = store_path
    code, out, _ = run(capsys, "ls", path, "--json")
    desc = json.loads(out)
    assert code == 0
    feat = desc["features"][FEAT]
    assert (feat["n_done"], feat["n_clips"], feat["n_errors"]) == (8, 12, 1)
    assert feat["random_weights"] is True and feat["weights"] == "RANDOM(seed=7)"
    assert feat["encoder"] == "clip/ViT-B-32@none" and len(feat["fingerprint"]) == 16
    with open_store(path, "r") as store:
        assert feat["fingerprint"] == store.feature_sets()[FEAT].fingerprint
    assert desc["index"]["splits"] == {"fold1_evaluate": 3, "fold1_train": 9}
    assert desc["index"]["n_clips"] == 12 and desc["index"]["classes"] == list(TAU_CLASSES)
    assert desc["predictions"]["zs/clip"]["n_done"] == 1 and desc["predictions"]["zs/clip"]["head"] == "zero_shot"
    assert desc["class_features"]["cliptext/ViT-B-32"]["shape"] == [10, 4]


def test_ls_pretrained_weights_has_no_warning(tmp_path, capsys):
    path = str(tmp_path / "p.zarr")
    build(path, weights={"kind": "pretrained", "tag": "openai"})
    code, out, _ = run(capsys, "ls", path)
    assert code == 0 and "openai" in out and "RANDOM" not in out and "WARNING" not in out


# ------------------------------------------------------------------------------------------ show
def test_show_metadata_stats_and_states(store_path, capsys):
    path, data = store_path
    with open_store(path, "r") as store:
        ids = store.clip_ids
    code, out, _ = run(capsys, "show", path, ids[1], "--json")
    desc = json.loads(out)
    assert code == 0
    assert desc["clip"]["label"] == "bus" and desc["clip"]["city"] == "prague"
    assert desc["clip"]["splits"] == ["fold1_train"] and desc["clip"]["video_path"].endswith(".mp4")
    stats = desc["features"][FEAT]
    values = data[1].astype(np.float64)
    assert stats["status"] == "done" and stats["shape"] == [N_SEG, DIM]
    assert stats["min"] == pytest.approx(values.min()) and stats["std"] == pytest.approx(values.std())
    assert desc["predictions"]["zs/clip"]["top_class"] == "park"
    _, failed, _ = run(capsys, "show", path, ids[9])
    assert "error: no video stream" in failed
    _, missing, _ = run(capsys, "show", path, ids[10])
    assert "not computed" in missing and "fold1_evaluate" in missing


# ------------------------------------------------------------------------------------------- get
def test_get_writes_npy(store_path, capsys, tmp_path):
    path, data = store_path
    with open_store(path, "r") as store:
        ids = store.clip_ids
    out_file = tmp_path / "x.npy"
    code, out, _ = run(capsys, "get", path, ids[6], FEAT, "-o", str(out_file))
    assert code == 0 and "shape [2, 3]" in out
    np.testing.assert_array_equal(np.load(out_file), data[6])
    code, _, _ = run(capsys, "get", path, ids[1], "--run", "zs/clip", "-o", str(out_file))
    assert code == 0 and np.load(out_file)[0, 4] == pytest.approx(0.55)


@pytest.mark.parametrize("args,code,message", [
    (["bus-prague-1-2", FEAT], 2, "nearest ids: bus-prague-1-1"),
    (["bus-prague-1-1", "clip/RN50"], 2, "the store has: clip/ViT-B-32"),
    (["street_traffic-prague-8-8", FEAT], 1, "has not been computed"),
    (["bus-prague-1-1"], 2, "exactly one of FEATURE or --run"),
    (["bus-prague-1-1", "--run", "nope"], 2, "no prediction run named 'nope'"),
])
def test_get_errors_exit_codes(store_path, capsys, tmp_path, args, code, message):
    path, _ = store_path
    got, out, err = run(capsys, "get", path, *args, "-o", str(tmp_path / "x.npy"))
    assert got == code and message in err and "Traceback" not in err
    assert not (tmp_path / "x.npy").exists()


# ---------------------------------------------------------------------------------------- verify
def test_verify_exit_codes_and_json(store_path, capsys):
    path, _ = store_path
    code, out, _ = run(capsys, "verify", path)
    assert code == 0 and "OK" in out
    with open_store(path, "a") as store:  # NaN in a finished clip: a problem verify must report
        bad = np.zeros((4, N_SEG, DIM), np.float16)
        bad[2, 0, 0] = np.inf
        store.write_rows(FEAT, 4, bad)
    code, out, _ = run(capsys, "verify", path)
    assert code == 1 and f"PROBLEM features/{FEAT}/data rows 4:8" in out
    code, out, _ = run(capsys, "verify", path, "--json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False and report["problems"][0]["rows"] == [4, 8]


# --------------------------------------------------------------------------------------- convert
def test_convert_then_ls_matches(store_path, capsys, tmp_path):
    path, data = store_path
    dst = str(tmp_path / ("c.h5" if path.endswith(".zarr") else "c.zarr"))
    code, out, _ = run(capsys, "convert", path, dst, "--quiet")
    assert code == 0 and "arrays copied" in out
    _, a, _ = run(capsys, "ls", path, "--json")
    _, b, _ = run(capsys, "ls", dst, "--json")
    a, b = json.loads(a), json.loads(b)
    assert a["backend"] != b["backend"]
    for key in ("index", "features", "class_features", "predictions"):
        assert a[key] == b[key]
    code, _, err = run(capsys, "convert", path, dst)
    assert code == 2 and "--overwrite" in err
    assert run(capsys, "convert", path, dst, "--overwrite", "--quiet")[0] == 0


# ------------------------------------------------------------------------------- usage and extract
def test_usage_errors(tmp_path, capsys):
    code, _, err = run(capsys, "ls", str(tmp_path / "nothing.zarr"))
    assert code == 2 and "no feature store" in err and "Traceback" not in err
    assert run(capsys)[0] == 2
    assert run(capsys, "frobnicate")[0] == 2
    assert run(capsys, "--help")[0] == 0


def test_extract_is_a_subcommand_like_the_others_and_imports_no_torch_until_work():
    """``featurestore --help`` and ``featurestore extract --help`` list the extract options without
    importing torch (a fresh interpreter: this one has torch already)."""
    code = ("import sys; from featurestore.cli import main; "
            "rc = main(['extract', '--help']); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', rc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--encoders" in done.stdout and "--scheduler" in done.stdout
    assert done.stdout.strip().endswith("NO-TORCH 0")


def test_extract_hands_arguments_to_the_library(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake_extract(dataset, store, encoders, **kwargs):
        seen.update(dataset=dataset, store=store, encoders=encoders, **kwargs)
        from featurestore.extract import ExtractSummary

        return ExtractSummary(str(store), "cpu", clips_selected=0)

    monkeypatch.setattr("featurestore.extract.extract", fake_extract)
    code = run(capsys, "extract", "tau/", "--store", "s.zarr", "--encoders", "logmel", "--quiet",
               "--encoder-option", "logmel.n_mels=64", "--classes", "a,b", "--segments", "3")[0]
    assert code == 0
    assert (seen["dataset"], seen["store"], seen["encoders"]) == ("tau/", "s.zarr", "logmel")
    assert seen["encoder_options"] == {"logmel": {"n_mels": 64}} and seen["classes"] == ["a", "b"]
    assert seen["segments"] == 3 and seen["progress"] is False
    code, _, err = run(capsys, "extract")
    assert code == 2 and "featurestore extract" in err


def test_the_extract_package_keeps_no_aliases_of_the_cli():
    """Nothing is released: names that moved to featurestore.cli are gone from the old place."""
    import featurestore.extract

    for old in ("run_extract", "add_extract_arguments", "main"):
        assert not hasattr(featurestore.extract, old)


def test_module_and_console_script(tmp_path):
    path = str(tmp_path / "s.zarr")
    build(path)
    for cmd in ([sys.executable, "-m", "featurestore"], [str(Path(sys.executable).parent / "featurestore")]):
        done = subprocess.run(cmd + ["ls", path, "--json"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["features"][FEAT]["n_done"] == 8
        bad = subprocess.run(cmd + ["show", path, "nope"], capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and "not in the store" in bad.stderr


def test_verify_lists_and_removes_temp_files_of_interrupted_writes(tmp_path, capsys):
    path = str(tmp_path / "s.zarr")
    build(path)
    chunk = chunk_file(path, f"features/{FEAT}/data")
    leftover = chunk.with_name(chunk.name + ".0123456789abcdef.partial")  # what a writer killed mid-rename leaves
    leftover.write_bytes(b"half a chunk")
    code, out, _ = run(capsys, "verify", path, "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["leftovers"] == [str(leftover)]
    code, out, err = run(capsys, "verify", path, "--remove-leftovers")
    assert code == 0 and "removed 1 temp file" in err and "temp file" not in out
    assert not leftover.exists()


def test_ctrl_c_in_any_command_is_one_line_and_exit_130(capsys):
    """Commands without their own Ctrl-C message (ls, show, verify, convert, search) say one line."""
    from featurestore.cli import run_command

    def interrupted() -> int:
        raise KeyboardInterrupt

    assert run_command("featurestore", "verify", interrupted) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("featurestore verify: interrupted; ")
