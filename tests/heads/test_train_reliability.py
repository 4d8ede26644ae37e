"""The trainer under hostile inputs and faults: NaN features, divergence, two trainers at once, a full
disk (a real ``RLIMIT_FSIZE``), crafted run files, and the permissions of what a run writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import heads
from featurestore.store import open_store
from heads.checkpoint import CheckpointError, NonFiniteWeightsError, load_weights, save_weights
from heads.cli import main as heads_main
from heads.config import TrainConfig
from heads.train import NonFiniteInputError, TrainingDivergedError
from heads.trained import TrainedHead, load_head

from tests import warm_child
from tests.heads._store import build_store
from tests.heads.test_train import SETUPS

ROOT = Path(__file__).resolve().parents[2]
FEATURES = ["clip/RN50x4", "clip/RN101", "clip/ViT-B-32"]
TRAIN_CLIP, TRAIN_ROW = "bus-city-0-5", 5  # rows of the tiny store (see _store._manifest)
VAL_CLIP, VAL_ROW = "airport-city-1-12", 12


def config(store: Path, out: Path, **kw) -> TrainConfig:
    base = dict(head="late_fusion", features=FEATURES, train_split="train", val_split="val", store=str(store),
                out=str(out), epochs=1, batch_size=16, progress=False)
    return TrainConfig(**{**base, **kw})


def cli_args(store: Path, out: Path, epochs: int, **extra: str) -> list[str]:
    args = ["train", "--store", str(store), "--head", "late_fusion", "--features", ",".join(FEATURES),
            "--train-split", "train", "--val-split", "val", "--out", str(out), "--epochs", str(epochs),
            "--batch-size", "16", "--quiet"]
    for flag, value in extra.items():
        args += ["--" + flag.replace("_", "-"), value]
    return args


def poison(store_path: Path, name: str, row: int, value: float = float("nan")) -> None:
    """Write ``value`` into one element of one clip's stored features, through the store API."""
    store = open_store(store_path, mode="a")
    chunk = store.feature_info(name).chunk_clips
    start = row // chunk * chunk
    block = np.array(store.read_rows(name, start, min(start + chunk, store.n_clips)))
    block[row - start, 1, 3] = value
    store.write_rows(name, start, block)
    store.close()


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -c code args`` (started warm: torch and heads already imported) from the repository."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    return warm_child.run(["-c", code, *args], cwd=ROOT, env=env, timeout=timeout)


# ------------------------------------------------------------------------------- item 1: NaN
@pytest.mark.parametrize("row, clip", [(TRAIN_ROW, TRAIN_CLIP), (VAL_ROW, VAL_CLIP)], ids=["train", "val"])
def test_a_nan_in_one_clips_features_stops_training_naming_the_clip_and_saves_no_model(tmp_path, row, clip):
    store = build_store(tmp_path / "s.zarr")
    poison(store, "clip/RN101", row)
    with pytest.raises(NonFiniteInputError, match=rf"'clip/RN101'.* 1 clip\(s\): {clip};"):
        heads.train(config(store, tmp_path / "run"))
    assert not (tmp_path / "run" / "best.safetensors").exists()
    assert not list((tmp_path / "run").glob("ckpt/*"))


def test_heads_train_on_an_infinite_feature_exits_2_with_one_line(tmp_path, capsys):
    store = build_store(tmp_path / "s.zarr")
    poison(store, "clip/ViT-B-32", TRAIN_ROW, float("inf"))
    assert heads_main(cli_args(store, tmp_path / "run", 1)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("heads train: error: feature set 'clip/ViT-B-32'")
    assert TRAIN_CLIP in err[0]
    assert not (tmp_path / "run" / "best.safetensors").exists()


def test_a_diverging_run_stops_naming_the_epoch_and_keeps_the_last_checkpoint(tmp_path):
    store = build_store(tmp_path / "s.zarr")
    out = tmp_path / "run"
    # epoch 1 at lr 0.01, then lr x 1000 from epoch 2: the loss becomes NaN in epoch 2
    cfg = config(store, out, epochs=3, lr=0.01, lr_milestones=[1], lr_gamma=1000.0)
    with pytest.raises(TrainingDivergedError, match=r"at epoch 2, step \d+"):
        heads.train(cfg)
    state = json.loads((out / "state.json").read_text())
    assert state["epoch"] == 1 and state["best_epoch"] == 1
    best, _ = load_weights(out / "best.safetensors")
    last, _ = load_weights(out / state["checkpoint"])
    assert all(torch.isfinite(t).all() for t in [*best.values(), *last.values()])
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_non_finite_weights_are_never_written(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(path, {"a": torch.ones(3)})
    with pytest.raises(NonFiniteWeightsError, match="tensor\\(s\\) b hold NaN"):
        save_weights(path, {"a": torch.ones(3), "b": torch.tensor([0.0, float("nan")])})
    assert load_weights(path)[0]["a"].tolist() == [1.0, 1.0, 1.0]  # the previous file stays


# ----------------------------------------------------------------- item 2: two trainers at once
_HOLDING_TRAINER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import heads
    from heads.config import TrainConfig
    store, out, marker, go = sys.argv[1:5]
    def wait_at_epoch_1(epoch, record):
        if epoch == 1:
            Path(marker).write_text("mid-run")
            deadline = time.monotonic() + 120
            while not Path(go).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
    cfg = TrainConfig(head="late_fusion", features=["clip/RN50x4", "clip/RN101", "clip/ViT-B-32"],
                      train_split="train", val_split="val", store=store, out=out, epochs=2, batch_size=16,
                      progress=False)
    heads.train(cfg, on_epoch_end=wait_at_epoch_1)
""")


def test_a_second_trainer_into_the_same_run_directory_is_refused_naming_the_first(tmp_path):
    store = build_store(tmp_path / "s.zarr")
    out, marker, go = tmp_path / "run", tmp_path / "marker", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    first = warm_child.start(["-c", _HOLDING_TRAINER, str(store), str(out), str(marker), str(go)], cwd=ROOT, env=env,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), first.stderr.read() if first.poll() is not None else "first trainer never started"
        second = run_python("import sys; from heads.cli import main; sys.exit(main(sys.argv[1:]))",
                            *cli_args(store, out, 3))
        go.write_text("")
        assert first.wait(timeout=120) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("heads train: error: "), second.stderr
    assert f"pid {first.pid}" in lines[0] and f"{out}.lock" in lines[0]
    state = json.loads((out / "state.json").read_text())  # only the first trainer's two epochs
    assert state["epoch"] == 2 and state["finished"]
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not Path(f"{out}.lock").exists()  # released when the first trainer ended


def test_fit_refuses_a_run_directory_another_process_trains_into(tmp_path):
    from featurestore.store.lock import StoreLockedError

    store = build_store(tmp_path / "s.zarr")
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from featurestore.store.lock import writer_lock
        with writer_lock(sys.argv[1], command="heads train (test holder)"):
            print("held", flush=True)
            time.sleep(60)
    """), str(out)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(StoreLockedError, match=rf"pid {holder.pid} .*heads train \(test holder\)"):
            heads.train(config(store, out))
        assert time.monotonic() - started < 10  # refused at once, never waits
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()  # the refused trainer wrote nothing


# -------------------------------------------------------------- item 9: crafted run.json sizes
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("run9")
    store = build_store(tmp / "s.zarr")
    heads.train(config(store, tmp / "run"))
    return tmp / "run"


def _crafted_copy(run: Path, dest: Path, **head_config) -> Path:
    dest.mkdir()
    for name in ("best.safetensors", "state.json"):
        (dest / name).write_bytes((run / name).read_bytes())
    info = json.loads((run / "run.json").read_text())
    info["head_config"].update(head_config)
    (dest / "run.json").write_text(json.dumps(info))
    return dest


_LOAD_UNDER_MEMORY_LIMIT = textwrap.dedent("""
    import resource, sys
    import torch
    from heads.trained import TrainedHead
    vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))  # 1 GiB more than now
    try:
        TrainedHead.load(sys.argv[1], device="cpu")
    except Exception as err:
        print(type(err).__name__ + ": " + str(err))
    # VmHWM: this process's own peak (ru_maxrss starts from the forking parent's, a big pytest)
    print("maxrss_kib", next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")))
""")


def test_a_run_json_claiming_ten_million_classes_fails_fast_in_small_memory(trained_run, tmp_path):
    run = _crafted_copy(trained_run, tmp_path / "crafted", n_classes=10_000_000)  # ~5 GB of classifier
    started = time.monotonic()
    done = run_python(_LOAD_UNDER_MEMORY_LIMIT, str(run))
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and len(lines) == 2, done.stderr
    assert lines[0].startswith("CheckpointError: ") and "classifier.weight [4, 128] (expected [10000000, 128])" \
        in lines[0], lines[0]
    assert int(lines[1].split()[1]) < 1_500_000  # KiB: nothing near the claimed size was allocated
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("change, match", [
    ({"n_classes": 5}, r"does not fit the late_fusion head run.json describes: shape of classifier\.bias \[4\]"),
    ({"input_dims": [24, 16]}, r"unexpected branches\.2\."),
    ({"n_classes": "many"}, r"head_config does not build a late_fusion head"),
], ids=["more-classes", "fewer-inputs", "not-a-number"])
def test_a_run_json_that_does_not_fit_its_weights_is_one_checkpoint_error(trained_run, tmp_path, change, match):
    run = _crafted_copy(trained_run, tmp_path / "crafted", **change)
    with pytest.raises(CheckpointError, match=match):
        load_head(run)


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_every_head_is_checked_on_the_meta_device_and_loads_its_trained_weights(name, tiny_store, tmp_path):
    features, head_config = SETUPS[name]
    cfg = TrainConfig(head=name, features=features, head_config=head_config, train_split="train", val_split=None,
                      out=str(tmp_path / name), epochs=1, batch_size=16, max_steps_per_epoch=1, progress=False)
    heads.train(cfg, tiny_store)
    head, _ = load_head(cfg.out)
    saved, _ = load_weights(Path(cfg.out) / "best.safetensors")
    assert all(torch.equal(head.state_dict()[k], saved[k]) for k in saved)


def test_a_run_json_that_is_not_an_object_is_a_checkpoint_error(trained_run, tmp_path):
    run = _crafted_copy(trained_run, tmp_path / "crafted")
    (run / "run.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="run.json: expected a JSON object, found list"):
        TrainedHead.load(run, device="cpu")


# ------------------------------------------------------------------- item 12: a full disk
_CLI_UNDER_FSIZE = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))  # run.json and metrics fit, weights do not
    from heads.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_a_full_disk_during_a_checkpoint_is_one_line_keeps_the_last_epoch_and_a_rerun_resumes(tmp_path, capsys):
    store = build_store(tmp_path / "s.zarr")
    out = tmp_path / "run"
    assert heads_main(cli_args(store, out, 1)) == 0
    epoch1 = (out / "ckpt" / "epoch_001.safetensors").read_bytes()
    assert len(epoch1) > 64 * 1024  # the limit really cuts the next checkpoint

    limited = run_python(_CLI_UNDER_FSIZE, *cli_args(store, out, 2))
    lines = limited.stderr.strip().splitlines()
    assert limited.returncode in (1, 2) and len(lines) == 1, limited.stderr
    assert lines[0].startswith("heads train: error: could not write ") and "file-size limit" in lines[0]
    assert json.loads((out / "state.json").read_text())["epoch"] == 1
    assert (out / "ckpt" / "epoch_001.safetensors").read_bytes() == epoch1
    assert not [p.name for p in out.rglob("*") if p.name.endswith(".tmp")]

    assert heads_main(cli_args(store, out, 2)) == 0  # the rerun resumes from epoch 1...
    assert heads_main(cli_args(store, tmp_path / "straight", 2)) == 0
    capsys.readouterr()
    resumed, _ = load_weights(out / "best.safetensors")
    straight, _ = load_weights(tmp_path / "straight" / "best.safetensors")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)  # ...to the same weights as a straight run


# -------------------------------------------------------------- issue 22 item 7: permissions
def test_run_files_follow_the_umask(tmp_path):
    store = build_store(tmp_path / "s.zarr")
    old = os.umask(0o022)
    try:
        heads.train(config(store, tmp_path / "run", epochs=1))
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"best.safetensors", "epoch_001.safetensors", "epoch_001.optim.safetensors",
                                        "run.json", "state.json", "metrics.jsonl"}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o644" for p in files}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_one_nan_check_finds_nan_and_infinities_and_passes_the_largest_finite_values(dtype):
    """`non_finite_tensors` sums in a dtype that cannot overflow (one pass): a thousand maxima are finite."""
    from heads.checkpoint import non_finite_tensors

    def with_values(*values: float) -> torch.Tensor:
        t = torch.zeros(10, dtype=dtype)
        t[: len(values)] = torch.tensor(values, dtype=torch.float64).to(dtype)
        return t

    tensors = {"largest": torch.full((1000,), torch.finfo(dtype).max, dtype=dtype), "ints": torch.arange(3),
               "nan": with_values(1.0, float("nan")), "inf": with_values(float("inf")),
               "both": with_values(float("inf"), -float("inf"))}
    assert non_finite_tensors(tensors) == ["nan", "inf", "both"]
