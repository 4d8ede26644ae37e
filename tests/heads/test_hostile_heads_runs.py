"""Hostile runs, part three: a run's own files edited, mixed or cut between writes, and scores of bad outputs.

A ``state.json`` edited (another epoch, another shape) or an optimizer file from another epoch never
resumes; weights holding NaN are never loaded; a run killed between ``state.json`` and the best
weights still loads its committed best; validation never scores unlabelled samples or NaN outputs.
"""
from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import heads
from featurestore.store import open_store
from featurestore.torchdata import TensorBatches
from heads.checkpoint import CheckpointError, NonFiniteWeightsError, load_weights
from heads.config import TrainConfig
from heads.evaluate import evaluate
from heads.trained import TrainedHead

from tests.heads._store import build_store

train_module = importlib.import_module("heads.train")  # `heads.train` the attribute is the function

FEATURE = "timm/test_resnet"


def config(out: Path, **kw) -> TrainConfig:
    base = dict(head="embedding_mlp", features=[FEATURE], train_split="train", val_split="val", out=str(out),
                epochs=1, batch_size=16, progress=False, seed=3)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # barely separable: epoch 2 beats epoch 1 (a run killed at epoch 2 then has an older best to keep)
    return build_store(tmp_path_factory.mktemp("runs3") / "s.zarr", n_clips=32, separation=1.0)


@pytest.fixture
def store(store_path: Path):
    opened = open_store(store_path, mode="r")
    yield opened
    opened.close()


def _edit_state(run_dir: Path, **changes) -> None:
    path = run_dir / "state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_state_json_with_an_edited_epoch_never_resumes_skipping_an_epoch(store, tmp_path):
    """Before: epoch 1's weights resumed as epoch 2's, and the run trained epoch 3 only (history [1, 3])."""
    heads.train(config(tmp_path / "run"), store)
    _edit_state(tmp_path / "run", epoch=2, finished=False)
    with pytest.raises(CheckpointError, match="holds the weights of epoch 1 but .*state.json says epoch 2"):
        heads.train(config(tmp_path / "run", epochs=3), store)


@pytest.mark.parametrize("state, said", [
    ([1, 2], "expected a JSON object, found list"),
    ({"epoch": "1"}, "'epoch' should be an integer, found str"),
    ({"epoch": 1}, "epoch 1 is committed but 'checkpoint' and 'optimizer' are missing"),
    ({"epoch": 1, "checkpoint": 7, "optimizer": "x"}, "'checkpoint' should be a string"),
])
def test_a_state_json_of_the_wrong_shape_is_one_checkpoint_error_naming_it(store, tmp_path, state, said):
    """Before: AttributeError / TypeError / KeyError from inside the trainer, naming no file."""
    heads.train(config(tmp_path / "run"), store)
    (tmp_path / "run" / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=f"state.json: {said}"):
        heads.train(config(tmp_path / "run", epochs=2), store)


@pytest.mark.parametrize("text, said", [
    (None, "line 1: not JSON"),  # cut in the middle of its line
    ('{"loss": 1.0}\n', "line 1: expected an epoch's record"),
])
def test_a_damaged_metrics_file_is_one_checkpoint_error_naming_its_line(store, tmp_path, text, said):
    """Before: a bare JSONDecodeError (or ``KeyError: 'epoch'``) from the resume's metrics truncation."""
    path = heads.train(config(tmp_path / "run"), store).run_dir / "metrics.jsonl"
    path.write_text(text if text is not None else path.read_text()[:40])
    with pytest.raises(CheckpointError, match=f"metrics.jsonl, {said}"):
        heads.train(config(tmp_path / "run", epochs=2), store)


def test_an_optimizer_file_of_another_epoch_never_resumes(store, tmp_path):
    """Before: the momentum of another epoch was resumed silently (only the weights' hash was recorded)."""
    heads.train(config(tmp_path / "a"), store)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    heads.train(config(tmp_path / "b", epochs=2), store)
    shutil.copy(tmp_path / "b/ckpt/epoch_002.optim.safetensors", tmp_path / "a/ckpt/epoch_001.optim.safetensors")
    with pytest.raises(CheckpointError, match="epoch_001.optim.safetensors' is not the file training wrote"):
        heads.train(config(tmp_path / "a", epochs=2), store)


def test_weights_holding_nan_are_never_loaded(store, tmp_path):
    """Before: a run without state.json (no hash to compare) loaded NaN weights and predicted NaN."""
    run = heads.train(config(tmp_path / "run"), store).run_dir
    weights, metadata = load_weights(run / "best.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, str(run / "best.safetensors"), metadata=metadata)
    (run / "state.json").unlink()
    with pytest.raises(NonFiniteWeightsError, match=f"best.safetensors' holds NaN or infinity in tensor.s. {name}"):
        TrainedHead.load(run, device="cpu")


def _kill_at(monkeypatch, function: str, file: str, call: int) -> None:
    """Make the train module's ``function`` raise KeyboardInterrupt on its ``call``-th write of ``file``."""
    real, calls = getattr(train_module, function), {"n": 0}

    def dies(path, data, *args, **kwargs):
        if Path(path).name == file:
            calls["n"] += 1
            if calls["n"] == call:
                raise KeyboardInterrupt
        return real(path, data, *args, **kwargs)

    monkeypatch.setattr(train_module, function, dies)


def test_a_run_killed_before_its_state_json_keeps_the_committed_best_weights(store, tmp_path, monkeypatch):
    """Before: best.safetensors held the uncommitted epoch 2 while state.json named epoch 1's hash, so
    the run could not be loaded, and a resume whose epoch 2 did not improve (another device) never could."""
    clean = heads.train(config(tmp_path / "clean", epochs=2), store)
    assert clean.history[1]["val_accuracy"] > clean.history[0]["val_accuracy"]  # epoch 2 is a new best
    _kill_at(monkeypatch, "write_json", "state.json", 2)
    with pytest.raises(KeyboardInterrupt):
        heads.train(config(tmp_path / "cut", epochs=2), store)
    state = json.loads((tmp_path / "cut/state.json").read_text())
    assert state["epoch"] == state["best_epoch"] == 1
    loaded = TrainedHead.load(tmp_path / "cut", device="cpu")  # refused as "damaged or replaced" before
    epoch_1 = load_weights(tmp_path / "cut/ckpt/epoch_001.safetensors")[0]
    assert all(torch.equal(loaded.head.state_dict()[k], epoch_1[k]) for k in epoch_1)


def test_a_run_killed_between_state_json_and_the_best_weights_is_repaired_by_the_rerun(store, tmp_path, monkeypatch):
    clean = heads.train(config(tmp_path / "clean", epochs=2), store)
    _kill_at(monkeypatch, "atomic_write_bytes", "best.safetensors", 2)
    with pytest.raises(KeyboardInterrupt):
        heads.train(config(tmp_path / "cut", epochs=2), store)
    monkeypatch.undo()
    assert json.loads((tmp_path / "cut/state.json").read_text())["best_epoch"] == 2  # committed, file not written
    assert heads.train(config(tmp_path / "cut", epochs=2), store).nothing_to_do
    assert (tmp_path / "cut/best.safetensors").read_bytes() == (clean.run_dir / "best.safetensors").read_bytes()
    TrainedHead.load(tmp_path / "cut", device="cpu")  # its hash is the committed one


def test_evaluate_refuses_unlabelled_samples_instead_of_scoring_them_as_the_last_class(tmp_path):
    """Before: label -1 indexed the last class's probability: accuracy and log-loss silently wrong."""
    head = heads.create_head("linear", input_dims=[6], n_classes=2)
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"label\(s\) \[-1\], not a class index in \[0, 2\)"):
        evaluate(head, TensorBatches([x], torch.tensor([0, 1, -1, 0]), 4), torch.device("cpu"))


def test_nan_validation_probabilities_stop_the_run_as_a_divergence_and_save_nothing(tmp_path):
    """Finite inputs whose logits overflow gave NaN probabilities; argmax(NaN) is class 0, so the epoch was
    scored (accuracy = the share of class-0 clips) and could be kept as the best."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(24) % 2
    x = torch.randn(24, 12, generator=gen) + labels[:, None] * 3.0
    torch.manual_seed(0)
    head = heads.create_head("linear", input_dims=[12], n_classes=2, l2_normalize=False)
    # finite inputs (the input check passes) aligned with class 0's weights: its logit overflows to +inf
    huge = (torch.sign(head.fc.weight[0].detach()) * 3.4e38).expand(4, 12).clone()
    assert torch.isfinite(huge).all() and not torch.isfinite(head([huge])).all()
    cfg = TrainConfig(head="linear", features=["x"], out=str(tmp_path / "mem"), epochs=1, lr=1e-30, progress=False)
    train, val = TensorBatches([x], labels, 8), TensorBatches([huge], torch.tensor([0, 1, 1, 1]), 4)
    with pytest.raises(train_module.TrainingDivergedError, match="NaN or infinite probabilities .* after epoch 1"):
        heads.fit(head, train, val, cfg, {})
    assert not (tmp_path / "mem/state.json").exists() and not (tmp_path / "mem/best.safetensors").exists()


@pytest.mark.parametrize("batch_size", [-1, 0, 2.5, True])
def test_predict_proba_refuses_a_batch_size_that_is_not_a_count(store, tmp_path, batch_size):
    """Before: ``batch_size=-1`` made range() empty and returned a [0, S, C] array for 4 clips; 0 was the
    default silently; 2.5 was a TypeError from range."""
    trained = TrainedHead.load(heads.train(config(tmp_path / "run"), store).run_dir, device="cpu")
    features = {FEATURE: store.get_many(FEATURE, store.clip_ids[:4])}
    assert trained.predict_proba(features, batch_size=3).shape[:2] == (4, 4)
    with pytest.raises(ValueError, match=f"batch_size must be an integer >= 1 .* got {batch_size!r}"):
        trained.predict_proba(features, batch_size=batch_size)


def test_a_resume_with_another_worker_count_is_refused_but_a_finished_run_is_still_done(store, tmp_path):
    """Before: num_workers was a resumable field, but worker processes shuffle their own share of the data
    (and drop their own short batch): epoch 2 of a run resumed with 1 worker saw another order, and the run
    ended with weights neither a 0-worker nor a 1-worker run gives, recorded as a 0-worker run."""
    heads.train(config(tmp_path / "run"), store)
    with pytest.raises(FileExistsError, match=r"train.num_workers\) \(.*resume with --num-workers 0\)"):
        heads.train(config(tmp_path / "run", epochs=2, num_workers=1), store)
    assert json.loads((tmp_path / "run/state.json").read_text())["epoch"] == 1
    assert heads.train(config(tmp_path / "run", num_workers=1), store).nothing_to_do  # nothing trains: any count


def test_a_metrics_line_left_by_an_attempt_killed_before_its_first_commit_is_not_kept(store, tmp_path):
    """A kill between an epoch's metrics line and its state.json (the commit) left the line; when no
    epoch had been committed the rerun started fresh without dropping it, and metrics.jsonl (and the
    history) held epoch 1 twice. Seen in test_sweep's random-kill test, about 1 run in 8."""
    import json

    cfg = config(tmp_path / "run")
    first = heads.train(cfg, store)
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    (tmp_path / "run" / "state.json").unlink()  # as if killed right after the metrics line of epoch 1
    for stale in (tmp_path / "run" / "ckpt").iterdir():
        stale.unlink()
    again = heads.train(cfg, store)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, cfg.epochs + 1)), lines
    assert [r["epoch"] for r in again.history] == [r["epoch"] for r in first.history]
    assert len(metrics.splitlines()) == cfg.epochs
