"""Inputs of the wrong shape are refused in one line instead of being silently misread.

A str where a list of clip ids is expected (iterated character by character: with one-letter ids it
even "works"); a CSV manifest, TAU meta.csv or split file row with a missing or extra field (read
into the wrong columns); a directory given to ``group_files``; a decode worker of ``FileEncoder``
that dies or cannot hand its batch over (a ``DecodeWorkerError``, exit 1 in the command lines).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from tests.featurestore.test_extract_support import write_wav

from featurestore import ClipRecord, Manifest, create_store, open_store
from featurestore.cli import main
from featurestore.clip_files import FilesError, group_files
from featurestore.datasets import DatasetFormatError, open_dataset, read_csv_manifest, read_tau, read_tau_eval

N_SEG, DIM = 2, 3
FEAT = "logmel"


# ------------------------------------------------------------------------- clip ids as a string
@pytest.fixture(params=["zarr", "hdf5"])
def store_path(request, tmp_path):
    """Clips 'a', 'b' and 'ab': a string 'ab' iterated gives two real ids."""
    path = tmp_path / ("s.zarr" if request.param == "zarr" else "s.h5")
    clips = [ClipRecord(i, label="x", splits=frozenset({"train"})) for i in ("a", "b", "ab")]
    with create_store(path, Manifest("toy", ["x"], clips)) as store:
        store.create_feature_set(FEAT, N_SEG, (DIM,), {"encoder": "logmel", "config": {}})
        store.write_rows(FEAT, 0, np.arange(3 * N_SEG * DIM, dtype=np.float16).reshape(3, N_SEG, DIM))
        store.create_predictions("run", N_SEG, {"head": "h"})
        store.write_predictions("run", np.arange(3), np.full((3, N_SEG, 1), 1.0, dtype=np.float32))
    return path


@pytest.mark.parametrize("ids", ["ab", b"ab"], ids=["str", "bytes"])
@pytest.mark.parametrize("method, single", [("get_many", "get(name, clip_id)"), ("get_predictions", None),
                                            ("rows", "row(clip_id)")])
def test_a_string_of_clip_ids_is_refused_in_one_line(store_path, method, single, ids) -> None:
    with open_store(store_path) as store:
        call = {"get_many": lambda: store.get_many(FEAT, ids), "rows": lambda: store.rows(ids),
                "get_predictions": lambda: store.get_predictions("run", ids)}[method]
        with pytest.raises(TypeError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"{method}: expected a list of clip ids")
        assert f"pass a list ([{ids!r}])" in message
        assert (f"or use {single} for one clip" in message) if single else "or use" not in message
        # the list form still works, and means the one clip 'ab'
        assert store.rows(["ab"]).tolist() == [2]
        assert store.get_many(FEAT, ["ab"]).shape == (1, N_SEG, DIM)
        assert store.get_predictions("run", ["ab"]).shape == (1, N_SEG, 1)


def test_clear_errors_refuses_a_string_too(store_path) -> None:
    with open_store(store_path, "a") as store:
        store.set_errors(FEAT, {"ab": "bad file"})
        with pytest.raises(TypeError, match=r"^clear_errors: expected a list of clip ids, got the str 'ab'"):
            store.clear_errors(FEAT, "ab")
        assert store.errors(FEAT) == {"ab": "bad file"}
        store.clear_errors(FEAT, ["ab"])
        assert store.errors(FEAT) == {}


# ------------------------------------------------------------------------- rows with the wrong width
def _csv(tmp_path: Path, rows: list[str]) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "clips.csv"
    path.write_text("clip_id,audio,label\n" + "\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("row, found", [("c,c.wav", 2), ("c,c.wav,z,extra", 4), ("c,c.wav,z,", 4)],
                         ids=["missing", "extra", "trailing-comma"])
def test_a_csv_manifest_row_with_a_missing_or_extra_field_is_refused(tmp_path, row, found) -> None:
    path = _csv(tmp_path, ["a,a.wav,x", "b,b.wav,y", row])
    with pytest.raises(DatasetFormatError) as info:
        read_csv_manifest(path)
    assert str(info.value) == (f"{path}, line 4: expected 3 comma-separated fields (from the header), "
                               f"found {found}")
    with pytest.raises(DatasetFormatError, match="line 4: expected 3"):
        open_dataset(path)


def test_featurestore_extract_refuses_a_short_row_in_one_line_before_any_work(tmp_path, capsys) -> None:
    data = tmp_path / "data"
    path = _csv(data, ["a,a.wav,x", "b,b.wav"])
    write_wav(data / "a.wav", 1.0, seed=0, rate=8000)
    store = tmp_path / "s.zarr"
    code = main(["extract", str(path), str(store), "--encoders", "logmel", "--device", "cpu", "--num-workers", "0",
                 "--segments", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [
        f"featurestore extract: error: {path}, line 3: expected 3 comma-separated fields (from the header), found 2"]
    assert not store.exists()


META = "filename_audio\tfilename_video\tscene_label\tidentifier\n"


def _meta_row(i: int, *extra: str) -> str:
    name = f"bus-lisbon-{i}-{i}"
    return "\t".join([f"audio/{name}.wav", f"video/{name}.mp4", "bus", f"lisbon-{i}", *extra])


def _tau(root: Path, meta_rows: list[str], fold: str | None = None) -> Path:
    (root / "audio").mkdir(parents=True)
    (root / "meta.csv").write_text(META + "\n".join(meta_rows) + "\n")
    if fold is not None:
        (root / "evaluation_setup").mkdir()
        (root / "evaluation_setup" / "fold1_train.csv").write_text(fold)
    return root


@pytest.mark.parametrize("bad, found", [(_meta_row(2, "surplus"), 5),
                                        ("audio/bus-lisbon-2-2.wav\tvideo/bus-lisbon-2-2.mp4\tbus", 3)],
                         ids=["extra", "missing"])
def test_a_tau_meta_row_with_a_missing_or_extra_field_is_refused(tmp_path, bad, found) -> None:
    root = _tau(tmp_path / "tau", [_meta_row(1), bad])
    with pytest.raises(DatasetFormatError) as info:
        read_tau(root)
    assert str(info.value) == (f"{root / 'meta.csv'}, line 3: expected 4 tab-separated fields (from the header), "
                               f"found {found}")


@pytest.mark.parametrize("fold, line, expected, found, source", [
    # with a header: a row with the label left out, and one with a surplus field
    ("filename_audio\tfilename_video\tscene_label\naudio/bus-lisbon-1-1.wav\tvideo/bus-lisbon-1-1.mp4\n", 2, 3, 2,
     "from the header"),
    ("filename_audio\tfilename_video\tscene_label\n"
     "audio/bus-lisbon-1-1.wav\tvideo/bus-lisbon-1-1.mp4\tbus\tlisbon-1\n", 2, 3, 4, "from the header"),
    # without a header (as DCASE has published fold files too): the first row sets the width
    ("audio/bus-lisbon-1-1.wav\tbus\naudio/bus-lisbon-2-2.wav\n", 2, 2, 1, "as on line 1"),
], ids=["header-missing", "header-extra", "no-header-missing"])
def test_a_split_file_row_with_a_missing_or_extra_field_is_refused(tmp_path, fold, line, expected, found,
                                                                   source) -> None:
    root = _tau(tmp_path / "tau", [_meta_row(1), _meta_row(2)], fold)
    split = root / "evaluation_setup" / "fold1_train.csv"
    message = f"{split}, line {line}: expected {expected} tab-separated fields ({source}), found {found}"
    with pytest.raises(DatasetFormatError) as info:
        read_tau(root)
    assert str(info.value) == message
    (root / "meta.csv").unlink()  # the same split file read as an evaluation set's
    with pytest.raises(DatasetFormatError) as info:
        read_tau_eval(root)
    assert str(info.value) == message


def test_well_formed_files_still_read(tmp_path) -> None:
    """Quoted cells with commas and empty cells are fields like any other."""
    path = _csv(tmp_path / "csv", ['a,"a,1.wav",x', "b,,y"])
    assert [c.audio for c in read_csv_manifest(path).clips] == [Path("a,1.wav"), None]
    fold = "filename_audio\tfilename_video\tscene_label\naudio/bus-lisbon-1-1.wav\tvideo/bus-lisbon-1-1.mp4\tbus\n"
    manifest = read_tau(_tau(tmp_path / "tau", [_meta_row(1), _meta_row(2)], fold))
    assert [sorted(c.splits) for c in manifest.clips] == [["fold1_train"], []]


# ------------------------------------------------------------------------- group_files and a directory
def test_group_files_calls_a_directory_a_directory(tmp_path) -> None:
    folder = tmp_path / "clips"
    folder.mkdir()
    wav = write_wav(folder / "x.wav", 0.5, seed=0, rate=8000)
    with pytest.raises(FilesError) as info:
        group_files([wav, folder])
    assert str(info.value) == (f"1 argument(s) are directories, not files: {folder}; give the audio and video "
                               f"files in them (e.g. DIR/*.wav DIR/*.mp4)")
    with pytest.raises(FilesError, match=r"^1 file\(s\) not found: .*nothing\.wav$"):
        group_files([wav, folder / "nothing.wav"])
    fifo = folder / "pipe.wav"
    os.mkfifo(fifo)
    with pytest.raises(FilesError, match=r"^1 argument\(s\) are not regular files .*pipe\.wav$"):
        group_files([fifo])


# ------------------------------------------------------------------------- a decode worker that dies
_ENCODE = textwrap.dedent("""
    import json, os, resource, signal, sys, threading, time
    from pathlib import Path
    from featurestore.encode_files import FileEncoder
    from featurestore.extract.errors import DecodeWorkerError

    provenance, files = json.loads(sys.argv[1]), sys.argv[2:]
    encoder = FileEncoder({"logmel": provenance}, "cpu", segments=1, batch_size=1, num_workers=1)

    def kill_the_worker():  # SIGKILL the first child this process forks (the decode worker)
        me = Path(f"/proc/{os.getpid()}/task")
        def children_of(task):  # a thread that ends while we look has no children file any more
            try:
                return (task / "children").read_text().split()
            except FileNotFoundError:
                return []

        while True:
            children = [c for t in me.iterdir() for c in children_of(t)]
            if children:
                os.kill(int(children[0]), signal.SIGKILL)
                return
            time.sleep(0.001)

    def encode():
        try:
            encoder.encode(files)
            print("no error")
        except DecodeWorkerError as err:
            print("DecodeWorkerError:", err)

    threading.Thread(target=kill_the_worker, daemon=True).start()
    encode()  # a worker killed with SIGKILL (40 batches of one clip: it dies long before the last)
    # a file-size limit: the worker cannot put its batch into shared memory (EFBIG, SIGXFSZ ignored)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    encode()
""")


@pytest.fixture(scope="module")
def logmel_provenance(tmp_path_factory) -> tuple[dict, list[Path]]:
    """The provenance of a log-mel feature set made by a real extraction, and 40 short WAV files."""
    from featurestore.extract import extract
    tmp = tmp_path_factory.mktemp("worker")
    wavs = [write_wav(tmp / f"c{i}.wav", 1.0, seed=i, rate=8000) for i in range(40)]
    (tmp / "clips.csv").write_text("clip_id,audio\n" + "".join(f"c{i},c{i}.wav\n" for i in range(2)))
    store = tmp / "s.zarr"
    assert extract(tmp / "clips.csv", store, "logmel", classes=["x"], segments=1, num_workers=0,
                   progress=False).exit_code == 0
    with open_store(store) as opened:
        return opened.feature_info("logmel").provenance, wavs


@pytest.mark.slow
def test_a_decode_worker_that_dies_is_a_decode_worker_error_in_one_line(logmel_provenance) -> None:
    """Before, a worker that could not hand its batch over was a bare RuntimeError, and one killed was
    torch's multi-line RuntimeError: both tracebacks in ``heads classify --num-workers N``."""
    provenance, wavs = logmel_provenance
    proc = subprocess.run([sys.executable, "-c", _ENCODE, json.dumps(provenance), *map(str, wavs)],
                          capture_output=True, text=True, timeout=180, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr[-3000:]
    killed, limited = proc.stdout.strip().splitlines()
    for line in (killed, limited):
        assert line.startswith("DecodeWorkerError: encoding the files stopped: ") and "--num-workers 0" in line
    # torch words a killed worker "killed by signal" or "exited unexpectedly" (whichever check sees it first)
    assert "a decode worker (pid " in killed, killed
    assert "shared memory" in limited and "File too large" in limited, limited


def test_decode_worker_error_is_a_failure_of_heads_classify() -> None:
    """heads maps it to exit 1 (the work failed, not bad input), as featurestore does."""
    from featurestore.extract.errors import DecodeWorkerError
    from heads import cli as heads_cli

    def run() -> int:
        raise DecodeWorkerError("encoding the files stopped: a decode worker (pid 1) was killed by signal: Killed")

    assert heads_cli.run_command("heads", "classify", run, usage=heads_cli._USAGE_ERRORS,
                                 failures=heads_cli._FAILURE_ERRORS) == 1


def test_torch_dataset_refuses_one_string_of_clip_ids(store_path):
    """``clip_ids="ab"`` used to reach the store as the list ['a', 'b']: two real clips."""
    with open_store(store_path) as store:
        with pytest.raises(TypeError, match="expected a list of clip ids"):
            store.torch_dataset([FEAT], clip_ids="ab")
