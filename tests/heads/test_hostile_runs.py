"""Run directories damaged or misused: one line naming the file and the key, never a traceback, and
``--overwrite`` never deletes a folder that is not a run's.

Before: a truncated ``run.json`` gave ``error: Unterminated string ...`` (no file named), a
``state.json`` holding a list or a number, or ``classes`` not a list, escaped as a ``TypeError``
traceback (exit 1), ``train.features`` as a string was read letter by letter, and
``heads train --out DIR --overwrite`` deleted DIR whole whatever it held (the store, a dataset).
"""
from __future__ import annotations

import json
import shutil

import pytest

import heads
from featurestore.store import open_store
from heads.checkpoint import CheckpointError
from heads.cli import main
from heads.config import TrainConfig
from heads.trained import load_head


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_store_path):
    out = tmp_path_factory.mktemp("hostile_runs") / "lin"
    with open_store(tiny_store_path) as store:
        heads.train(TrainConfig(head="linear", features=["clip/ViT-B-32"], train_split="train", val_split="val",
                                out=str(out), epochs=1, batch_size=16, progress=False), store)
    return out


def _damaged(run, tmp_path, file: str, edit) -> str:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    path = copy / file
    if callable(edit):
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
    else:
        path.write_text(edit)
    return str(copy)


DAMAGE = {
    "truncated run.json": ("run.json", '{"head": "linear", "head_con', "run.json is not valid JSON"),
    "run.json a list": ("run.json", "[1, 2]", "run.json: expected a JSON object, found list"),
    "no train": ("run.json", lambda d: d.pop("train"), "'train' should be an object, found nothing"),
    "classes a number": ("run.json", lambda d: d.__setitem__("classes", 5), "'classes' should be a list"),
    "features a string": ("run.json", lambda d: d["train"].__setitem__("features", "clip/ViT-B-32"),
                          "'train.features' should be a non-empty list"),
    "input without fingerprint": ("run.json", lambda d: d.__setitem__("features", {}),
                                  "'features' should map every input"),
    "shape not sizes": ("run.json", lambda d: d["feature_info"]["clip/ViT-B-32"].__setitem__("shape", "4x16"),
                        "shape' should be a list of sizes"),
    "state.json a list": ("state.json", "[]", "state.json: expected a JSON object, found list"),
    "checkpoint a number": ("state.json", '{"checkpoint": 5}', "'checkpoint' should be a string, found int"),
    "truncated state.json": ("state.json", '{"checkpoint": "ck', "state.json is not valid JSON"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_run_file_is_refused_naming_it(run, tmp_path, case):
    file, edit, said = DAMAGE[case]
    damaged = _damaged(run, tmp_path, file, edit)
    with pytest.raises(CheckpointError, match="state.json|run.json") as caught:
        load_head(damaged, weights="last")
    assert said in str(caught.value) and damaged in str(caught.value)


def test_predict_on_a_damaged_run_is_one_line_exit_2(run, tmp_path, tiny_store_path, capsys):
    damaged = _damaged(run, tmp_path, "state.json", "[]")
    code = main(["predict", "--store", str(tiny_store_path), "--run", damaged, "--weights", "last", "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "state.json: expected a JSON object" in err


def test_overwrite_refuses_a_folder_that_is_not_a_run_and_keeps_it(tmp_path, tiny_store_path, capsys):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    code = main(["train", "--store", str(tiny_store_path), "--head", "linear", "--features", "clip/ViT-B-32",
                 "--train-split", "train", "--val-split", "val", "--epochs", "1", "--out", str(folder),
                 "--overwrite", "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "is not a run directory" in err
    assert (folder / "notes.txt").read_text() == "precious"


def test_overwrite_still_replaces_a_run_and_a_run_killed_before_its_run_json(run, tmp_path, tiny_store_path):
    killed = tmp_path / "killed"
    (killed / "ckpt").mkdir(parents=True)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "notes.txt").write_text("kept by nobody: it is inside a run directory")
    with open_store(tiny_store_path) as store:
        for out in (killed, copy):
            heads.train(TrainConfig(head="linear", features=["clip/ViT-B-32"], train_split="train", val_split="val",
                                    out=str(out), epochs=1, batch_size=16, progress=False), store, overwrite=True)
            assert (out / "run.json").is_file() and (out / "best.safetensors").is_file()
    assert not (copy / "notes.txt").exists()


def test_predict_with_an_unknown_split_leaves_the_store_as_it_was(run, tmp_path, tiny_store_path, capsys):
    """Before: the run was created (empty) before the split was looked up, and with --overwrite an
    existing run was emptied, then the command was refused."""
    store = tmp_path / "own.zarr"
    shutil.copytree(tiny_store_path, store)
    assert main(["predict", "--store", str(store), "--run", str(run), "--name", "p", "-q"]) == 0
    for extra in (["--name", "new"], ["--name", "p", "--overwrite"]):
        assert main(["predict", "--store", str(store), "--run", str(run), "--split", "nosuch", "-q", *extra]) == 2
        assert "no clip has split 'nosuch'" in capsys.readouterr().err
    with open_store(store) as opened:
        assert sorted(opened.prediction_runs()) == ["p"] and opened.prediction_done("p").all()


@pytest.mark.parametrize("out, said", [("a.wav", "names an audio or video file"), ("RUN/probs.csv", "lies in the run"),
                                       ("folder", "is a directory")])
def test_classify_out_that_would_overwrite_a_recording_or_the_run_is_refused_first(run, tmp_path, capsys, out, said):
    """``heads classify RUN --out a.wav b.wav`` took a.wav as the flag's value and, after classifying
    b.wav, replaced the recording by the CSV."""
    recording = tmp_path / "a.wav"
    recording.write_bytes(b"RIFF recording")
    (tmp_path / "folder").mkdir()
    target = str(run / out.removeprefix("RUN/")) if out.startswith("RUN/") else str(tmp_path / out)
    code = main(["classify", str(run), "--out", target, str(tmp_path / "b.wav"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and said in err
    assert recording.read_bytes() == b"RIFF recording" and not (run / "probs.csv").exists()


@pytest.mark.parametrize("inside", ["", "runs/lin"])
def test_train_out_in_the_store_is_refused(tmp_path, tiny_store_path, capsys, inside):
    store = tmp_path / "own.zarr"
    shutil.copytree(tiny_store_path, store)
    before = sorted(p.name for p in store.iterdir())
    code = main(["train", "--store", str(store), "--head", "linear", "--features", "clip/ViT-B-32", "--train-split",
                 "train", "--val-split", "val", "--epochs", "1", "--out", str(store / inside), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "a run directory belongs beside the store" in err
    assert sorted(p.name for p in store.iterdir()) == before and not (tmp_path / "own.zarr.lock").exists()


def test_zero_epochs_do_not_claim_saved_weights(tmp_path, tiny_store_path, capsys):
    out = tmp_path / "e0"
    assert main(["train", "--store", str(tiny_store_path), "--head", "linear", "--features", "clip/ViT-B-32",
                 "--train-split", "train", "--val-split", "val", "--epochs", "0", "--out", str(out), "-q"]) == 0
    err = capsys.readouterr().err
    assert "no weights saved" in err and "best.safetensors" not in err and not (out / "best.safetensors").exists()


def _flip_last_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # a tensor's byte: the header still parses, the shapes still fit
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("weights", ["best", "last"])
def test_a_flipped_bit_in_the_weights_is_refused(run, tmp_path, weights):
    """safetensors has no checksum: before, the flipped weights loaded and predicted silently."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    state = json.loads((copy / "state.json").read_text())
    _flip_last_byte(copy / ("best.safetensors" if weights == "best" else state["checkpoint"]))
    with pytest.raises(CheckpointError, match="is not the file training wrote"):
        load_head(copy, weights=weights)


def test_a_flipped_bit_in_the_checkpoint_never_resumes(run, tmp_path, tiny_store_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    _flip_last_byte(copy / json.loads((copy / "state.json").read_text())["checkpoint"])
    with open_store(tiny_store_path) as store, pytest.raises(CheckpointError, match="is not the file training wrote"):
        heads.train(TrainConfig(head="linear", features=["clip/ViT-B-32"], train_split="train", val_split="val",
                                out=str(copy), epochs=2, batch_size=16, progress=False), store)
