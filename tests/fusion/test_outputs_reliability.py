"""Fusion's output files under real faults: a full disk, NaN predictions, wrong ``--out`` paths, warnings.

A full disk is a real ``RLIMIT_FSIZE`` in a subprocess (SIGXFSZ ignored, so a write past the limit
fails with EFBIG as it would with ENOSPC), running the real ``fusion`` command or library call with a
previous good file in place: the old file must be byte-identical and the same inode afterwards (it
was not rewritten), no temp file is left beside it, and the command says one line and exits 1.
NaN predictions are written into a copy of the tiny store below the checks of ``write_predictions``
(``store.arrays``), as a store written before those checks, or a crafted one, holds them.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from featurestore import ClipRecord, Manifest, open_store
from fusion.cli import main

#: No run with random weights: on failure stderr holds the error line and nothing else.
PLAIN = {"name": "AC", "families": {"A04": ["A01", "A02"], "C04": ["C04"]}, "postprocess": {"method": "eq1"}}
KEPT = "the previous file (if any) is unchanged"


def _recipe(tmp_path: Path, recipe: dict, name: str = "recipe.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(recipe))
    return path


def _limited(limit: int):
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, no kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def _run_limited(argv: list[str], limit: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, preexec_fn=_limited(limit),
                          env=env, timeout=300)


def _snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    """Every file's inode and bytes: equal afterwards means not rewritten, not renamed over, no new file."""
    return {p.name: (p.stat().st_ino, p.read_bytes()) for p in sorted(directory.iterdir())}


def _one_error_line(stderr: str, prefix: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), stderr
    return lines[0]


# ---------------------------------------------------------------- full disk (RLIMIT_FSIZE) --------

def test_submit_on_a_full_disk_keeps_the_previous_submission(tiny_store_path, tmp_path):
    out = tmp_path / "out"
    sub = out / "sub.csv"
    args = ["submit", "--store", str(tiny_store_path), "--recipe", str(_recipe(tmp_path, PLAIN)),
            "--split", "fold1_test", "--out", str(sub)]
    assert main(args) == 0 and sub.stat().st_size > 800
    before = _snapshot(out)
    done = _run_limited(["-m", "fusion", *args], limit=400)
    assert done.returncode == 1
    line = _one_error_line(done.stderr, f"fusion submit: error: could not write {sub}: ")
    assert "file-size limit" in line and KEPT in line
    assert _snapshot(out) == before


def test_report_on_a_full_disk_keeps_every_previous_report_file(tiny_store_path, tmp_path):
    """report.md and metrics.json fit under the limit, the PNGs do not: none of the four is replaced."""
    out = tmp_path / "report"
    args = ["report", "--store", str(tiny_store_path), "--recipe", str(_recipe(tmp_path, PLAIN)),
            "--split", "fold1_evaluate", "--out", str(out)]
    assert main(args) == 0
    before = _snapshot(out)
    assert sorted(before) == ["confusion.png", "metrics.json", "reliability.png", "report.md"]
    sizes = {name: len(data) for name, (_, data) in before.items()}
    limit = 30_000
    assert max(sizes["report.md"], sizes["metrics.json"]) < limit < min(sizes["confusion.png"], sizes["reliability.png"])
    done = _run_limited(["-m", "fusion", *args], limit=limit)
    assert done.returncode == 1
    line = _one_error_line(done.stderr, "fusion report: error: could not write ")
    assert ".png: file-size limit" in line and KEPT in line
    assert _snapshot(out) == before


LIBRARY_WRITERS = {
    "fusion classify --out CSV": """
        from pathlib import Path
        import numpy as np
        from featurestore.clip_files import ClipFiles
        from fusion.classify import FusedFiles
        clips = [ClipFiles(f"clip{i}", audio=Path(f"clip{i}.wav")) for i in range(40)]
        probs = np.full((40, 10), 0.1)
        FusedFiles("r", [f"class{c}" for c in range(10)], clips, probs, {}).write_csv(TARGET)
    """,
    "recipe written by fusion": """
        from fusion.recipe import FusionRecipe
        recipe = FusionRecipe.from_dict({"name": "x" * 3000, "families": {"A": ["A01"]}}, "test")
        recipe.to_json(TARGET)
    """,
    "featurestore write_manifest": """
        from featurestore import open_store
        from featurestore.store.export import write_manifest
        with open_store(STORE) as store:
            write_manifest(store, TARGET)
    """,
}


@pytest.mark.parametrize("writer", sorted(LIBRARY_WRITERS))
def test_library_writers_on_a_full_disk_keep_the_previous_file(writer, tiny_store_path, tmp_path):
    target = tmp_path / "out" / "previous.txt"
    target.parent.mkdir()
    target.write_bytes(b"previous good file\n" * 10)
    before = _snapshot(target.parent)
    script = f"TARGET, STORE = {str(target)!r}, {str(tiny_store_path)!r}\n" + textwrap.dedent(LIBRARY_WRITERS[writer])
    done = _run_limited(["-c", script], limit=1000)
    assert done.returncode == 1
    assert f"OutputWriteError: could not write {target}: file-size limit reached" in done.stderr, done.stderr
    assert _snapshot(target.parent) == before


def test_extract_summary_json_on_a_full_disk_keeps_the_previous_summary(tmp_path):
    from tests.featurestore.test_extract_support import make_dataset

    from featurestore.cli import main as featurestore_main

    root = tmp_path / "TAU-urban-audio-visual-scenes-2021-development"
    make_dataset(root, 1, seconds=10.0, rate=8000, fps=1)
    out = tmp_path / "out"
    out.mkdir()
    summary = out / "summary.json"
    args = ["extract", str(root), str(tmp_path / "s.zarr"), "--encoders", "logmel", "--device", "cpu",
            "--num-workers", "0", "--quiet", "--summary-json", str(summary)]
    assert featurestore_main(args) == 0
    before = _snapshot(out)
    # The limit is set just before the summary is written (the run writes its lock record and
    # rereads the store first, which a limit set at start-up would hit instead): a real RLIMIT_FSIZE,
    # injected at the one write under test.
    script = (f"import resource, signal, sys\nimport featurestore.cli as cli\n"
              f"signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\nreal = cli.atomic_write_text\n"
              f"def limited(*a, **k):\n    resource.setrlimit(resource.RLIMIT_FSIZE, (8, 8))\n    return real(*a, **k)\n"
              f"cli.atomic_write_text = limited\nsys.exit(cli.main({args!r}))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    line = _one_error_line(done.stderr, f"featurestore extract: error: could not write {summary}: ")
    assert "file-size limit" in line and KEPT in line
    assert _snapshot(out) == before


# ---------------------------------------------------------------- non-finite probabilities --------

@pytest.fixture()
def nan_store(tiny_store_path, tmp_path) -> tuple[Path, list[str]]:
    """A copy of the tiny store whose run A01 holds NaN for two fold1_test clips."""
    path = tmp_path / "nan.zarr"
    shutil.copytree(tiny_store_path, path)
    with open_store(path, mode="a") as store:
        bad = store.select(split="fold1_test")[2:4]
        for row in store.rows(bad):
            block = store.get_predictions("A01", [store.clip_ids[row]])
            block[0, 3, :] = np.nan
            store.arrays.write("predictions/A01/probs", int(row), block)
    return path, bad


def test_submit_refuses_nan_predictions_naming_the_clips_and_the_run(nan_store, tmp_path, capsys):
    store, bad = nan_store
    sub = tmp_path / "sub.csv"
    sub.write_text("previous\n")
    code = main(["submit", "--store", str(store), "--recipe", str(_recipe(tmp_path, PLAIN)),
                 "--split", "fold1_test", "--out", str(sub)])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    line = _one_error_line(captured.err, "fusion submit: error: prediction run 'A01' holds non-finite")
    assert all(clip in line for clip in bad) and "2 clip(s)" in line
    assert sub.read_text() == "previous\n" and sorted(os.listdir(tmp_path)) == ["nan.zarr", "recipe.json", "sub.csv"]


def test_classify_refuses_a_nan_answer_naming_the_clips_and_the_run(tiny_store):
    """The fusion of new clips (what ``fusion classify`` prints and writes) refuses a NaN from a run."""
    from fusion.classify import RunProbs, fuse_new_clips
    from fusion.recipe import FusionRecipe
    from fusion._validate import NonFiniteProbabilitiesError

    rng = np.random.default_rng(0)
    answers = {run: RunProbs(run, "runs/" + run, {f"new{i}": rng.dirichlet(np.ones(10), size=10 if run[0] == "A"
                                                                           else 12).astype(np.float32)
                                                  for i in range(3)}) for run in ("A01", "A02", "C04")}
    answers["C04"].segment_probs["new1"][0, 0] = np.inf
    with pytest.raises(NonFiniteProbabilitiesError, match=r"prediction run 'C04' holds non-finite .* 1 clip\(s\): new1;"):
        fuse_new_clips(tiny_store, FusionRecipe.from_dict(PLAIN, "test"), ["new0", "new1", "new2"], answers)


def test_a_heads_answer_with_nan_is_refused_naming_the_run_and_clips(tiny_store):
    """``heads classify --json`` prints NaN as the JSON token ``NaN``; fusion refuses it before fusing."""
    from fusion.classify import read_answer
    from fusion._validate import NonFiniteProbabilitiesError

    classes = list(tiny_store.classes)
    row = ", ".join(["0.1"] * len(classes))
    text = ('{"classes": %s, "features": {}, "errors": {}, "clips": [{"clip": "park1", "segment_probs": [[%s]]}, '
            '{"clip": "bus2", "segment_probs": [[NaN%s]]}]}' % (json.dumps(classes), row, ", 0.1" * (len(classes) - 1)))
    assert np.isnan(json.loads(text)["clips"][1]["segment_probs"][0][0])  # the crafted answer parses as heads' would
    with pytest.raises(NonFiniteProbabilitiesError,
                       match=r"the answer of run 'V01' \(runs/v01\) holds non-finite .* 1 clip\(s\): bus2;"):
        read_answer("V01", "runs/v01", {}, json.loads(text), classes)


def test_the_output_guard_names_the_recipe_and_its_runs():
    """A step that makes a NaN out of finite inputs is caught before anything is written."""
    from fusion.pipeline import check_output
    from fusion.recipe import FusionRecipe
    from fusion._validate import NonFiniteProbabilitiesError

    final = np.full((3, 10), 0.1)
    final[1, 4] = np.nan
    with pytest.raises(NonFiniteProbabilitiesError, match=r"recipe 'AC' \(runs A01, A02, C04\) .* 1 clip\(s\): b;"):
        check_output(FusionRecipe.from_dict(PLAIN, "test"), final, ["a", "b", "c"])


# ---------------------------------------------------------------- wrong --out paths ---------------

def test_report_out_an_existing_file_is_one_usage_line(tiny_store_path, tmp_path, capsys):
    existing = tmp_path / "report.md"
    existing.write_text("mine\n")
    code = main(["report", "--store", str(tiny_store_path), "--recipe", str(_recipe(tmp_path, PLAIN)),
                 "--split", "fold1_evaluate", "--out", str(existing)])
    assert code == 2
    _one_error_line(capsys.readouterr().err, f"fusion report: error: report directory {str(existing)!r} is a file")
    assert existing.read_text() == "mine\n"


@pytest.mark.parametrize("command", ["submit", "classify"])
def test_out_an_existing_directory_is_one_usage_line(command, tiny_store_path, tmp_path, capsys):
    directory = tmp_path / "outdir"
    directory.mkdir()
    argv = [command, "--store", str(tiny_store_path), "--recipe", str(_recipe(tmp_path, PLAIN)), "--out",
            str(directory)]
    argv += ["--split", "fold1_test"] if command == "submit" else [str(tmp_path / "x.wav")]
    assert main(argv) == 2
    _one_error_line(capsys.readouterr().err, f"fusion {command}: error: output file {str(directory)!r} is a directory")
    assert list(directory.iterdir()) == [] and sorted(os.listdir(tmp_path)) == ["outdir", "recipe.json"]


# ---------------------------------------------------------------- warnings -----------------------

def test_evaluate_and_submit_say_which_runs_use_random_weights(tiny_store_path, paper_recipe_dict, tmp_path, capsys):
    recipe = str(_recipe(tmp_path, paper_recipe_dict))
    warning = "WARNING: run V01 uses RANDOM weights (timm/test_vit)"
    assert main(["evaluate", "--store", str(tiny_store_path), "--recipe", recipe, "--split", "fold1_evaluate"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(warning) and "WARNING: run V02 uses RANDOM" in out and "run A01" not in out
    assert main(["submit", "--store", str(tiny_store_path), "--recipe", recipe, "--split", "fold1_test",
                 "--out", str(tmp_path / "sub.csv"), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["clips"] == 8  # stdout stays one JSON object
    assert captured.err.startswith(warning) and "run C04" not in captured.err


def test_a_stacking_warning_is_one_line_without_source_lines(tiny_store_path, tmp_path, capsys):
    """A fit split missing classes: the stacking calibrator warns once, as ``fusion <cmd>: warning:``."""
    path = tmp_path / "store.zarr"
    shutil.copytree(tiny_store_path, path)
    with open_store(path, mode="a") as store:
        classes = store.classes
        clips = [ClipRecord(f"fit-{i}", label=classes[i % 2], city="x", location=f"x-{i % 2}",
                            splits=frozenset({"two_class_fit"})) for i in range(8)]
        store.append_clips(Manifest("fit", classes, clips, root=None, audio_segments=10, video_frames=12))
        rows = store.rows([c.clip_id for c in clips])
        for run, attrs in store.prediction_runs().items():
            n_seg = store.get_predictions(run, [store.clip_ids[0]]).shape[1]
            probs = np.full((len(rows), n_seg, len(classes)), 0.02, dtype=np.float32)
            probs[np.arange(len(rows)), :, np.arange(len(rows)) % 2] = 0.82
            store.write_predictions(run, rows, probs)
    recipe = {**PLAIN, "calibration": {"method": "stacking", "fit_split": "two_class_fit"}}
    assert main(["evaluate", "--store", str(path), "--recipe", str(_recipe(tmp_path, recipe)),
                 "--split", "fold1_evaluate"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [line for line in err if line.startswith("fusion evaluate: warning: ")], err
    assert sum("stacking calibrator: classes [2, 3, 4, 5, 6, 7, 8, 9] have no clip" in line for line in err) == 1
