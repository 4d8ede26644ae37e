"""``heads classify`` under hostile input: out-of-range audio, a NaN model, huge sizes, directories, a full disk.

No non-finite probability is ever printed or written: a clip whose features or outputs hold NaN or
infinity fails alone (exit 1, ``FAILED <clip>: ...``). Sizes from flags are refused in one line
naming the flag before anything is allocated. The ``--out`` CSV goes through a temp name and a
rename: under a real ``RLIMIT_FSIZE`` (SIGXFSZ ignored, so writes fail with EFBIG as on a full disk)
the previous file stays byte-identical and the command says one line and exits 1.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import time
from functools import partial

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

import heads
from featurestore.demo import make_demo_dataset
from featurestore.extract import extract
from featurestore.store import open_store
from heads.cli import main

from tests import warm_child
from tests.warm_child import file_size_limit


@pytest.fixture(scope="module")
def audio_run(tmp_path_factory):
    """A spectrogram_cnn run on log-mel of a 10-clip demo dataset (one 1 s segment per clip)."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("classify_rel")
    root = make_demo_dataset(tmp / "ds", clips_per_class=1, clips_per_location=1, duration=1.0, sample_rate=16000,
                             width=32, height=32, fps=2, progress=False)
    store = tmp / "s.zarr"
    assert extract(root, store, "logmel", segments=1, num_workers=0, progress=False).exit_code == 0
    cfg = heads.TrainConfig(head="spectrogram_cnn", features=["logmel"], train_split="fold1_train", val_split=None,
                            head_config={"backbone": "test_resnet"}, epochs=1, batch_size=4, max_steps_per_epoch=1,
                            device="cpu", progress=False, out=str(tmp / "A"))
    with open_store(store) as opened:
        heads.train(cfg, opened)
    wavs = sorted((root / "audio").glob("*.wav"))
    return {"run": tmp / "A", "wavs": wavs, "tmp": tmp}


def _no_non_finite_text(text: str) -> None:
    """No NaN or infinity in a table or CSV (FAILED lines, which say why in words, aside)."""
    for line in text.splitlines():
        if not line.startswith(("FAILED ", "WARNING: ")):
            words = line.lower().replace(",", " ").split()
            assert not {"nan", "inf", "-inf"} & set(words), text


def test_a_clip_whose_features_are_not_finite_fails_alone_and_no_inf_is_printed_or_written(audio_run, tmp_path, capsys):
    samples, rate = sf.read(audio_run["wavs"][0], dtype="float32")
    loud = tmp_path / "loud.wav"  # finite float samples whose power overflows float32: log-mel is inf
    sf.write(loud, samples * np.float32(1e30), rate, subtype="FLOAT")
    good = audio_run["wavs"][1]
    out = tmp_path / "probs.csv"
    assert main(["classify", str(audio_run["run"]), str(loud), str(good), "--device", "cpu", "-q",
                 "--out", str(out)]) == 1
    captured = capsys.readouterr()
    _no_non_finite_text(captured.out)
    failed = [line for line in captured.out.splitlines() if line.startswith("FAILED")]
    assert failed == ["FAILED loud: logmel: the features hold NaN or infinity (samples out of range in the file?)"]
    rows = list(csv.DictReader(out.open()))
    assert [r["clip"] for r in rows] == [good.stem]
    assert all(np.isfinite(float(v)) for v in list(rows[0].values())[3:])
    assert "Traceback" not in captured.err


def test_a_run_with_nan_weights_prints_no_nan_probability(audio_run, tmp_path, capsys):
    run = tmp_path / "nan_run"
    shutil.copytree(audio_run["run"], run)
    state = load_file(run / "best.safetensors")
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()},
              str(run / "best.safetensors"))  # as a diverged trainer of old saved it
    progress = json.loads((run / "state.json").read_text())
    del progress["best_sha256"]  # a trainer of old recorded no hash of the weights (they are checked since)
    (run / "state.json").write_text(json.dumps(progress))
    out = tmp_path / "nan.csv"
    code = main(["classify", str(run), *map(str, audio_run["wavs"][:2]), "--device", "cpu", "-q", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1 and "Traceback" not in captured.err
    _no_non_finite_text(captured.out)
    if out.exists():  # a loader that refuses NaN weights outright writes no CSV at all: as good
        _no_non_finite_text(out.read_text())
        assert len(out.read_text().splitlines()) == 1  # the header: no clip was classified
    assert captured.out.count("the head gave NaN or infinite probabilities") == 2 or "NaN" in captured.err


@pytest.mark.parametrize("flag, value", [("--frames", "100000000"), ("--segments", "1000000000"),
                                         ("--batch-size", "0"), ("--num-workers", "100000")])
def test_sizes_from_flags_are_bounded_before_anything_is_allocated(audio_run, flag, value, capsys):
    t0 = time.perf_counter()
    assert main(["classify", str(audio_run["run"]), str(audio_run["wavs"][0]), flag, value, "--device", "cpu"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"heads classify: error: {flag} must be an integer from ")
    assert lines[0].endswith(f"got {value}") and time.perf_counter() - t0 < 5


def test_a_directory_argument_is_called_a_directory(audio_run, capsys):
    folder = audio_run["wavs"][0].parent
    assert main(["classify", str(audio_run["run"]), str(folder), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"heads classify: error: 1 argument(s) are directories, not files: {folder}; give the audio and "
                   f"video files in them (e.g. DIR/*.wav DIR/*.mp4)")


def test_a_full_disk_while_writing_the_csv_keeps_the_previous_file_and_is_one_line(audio_run, tmp_path):
    out = tmp_path / "probs.csv"
    out.write_text("previous,good,file\n")
    before = (out.stat().st_ino, out.read_bytes())
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    done = warm_child.run(["-m", "heads", "classify", str(audio_run["run"]), *map(str, audio_run["wavs"][:2]),
                           "--device", "cpu", "-q", "--out", str(out)],
                          preexec_fn=partial(file_size_limit, 100), env=env, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0] == (f"heads classify: error: could not write {out}: file-size limit reached; "
                        f"the previous file (if any) is unchanged")
    assert (out.stat().st_ino, out.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probs.csv"]  # no temp file left beside it
