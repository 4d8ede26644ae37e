"""The one trainer: SGD with momentum, step decay, focal loss, best epoch by validation accuracy, resumable.

`fit` is the core and works on any loaders that yield `featurestore.torchdata.Batch` and have a
``set_epoch`` method (in-memory `TensorBatches` or a `StoreDataset`); `train` builds the head and the
loaders from a store and a `TrainConfig`, then calls `fit`.

Determinism: the head is initialised under ``torch.manual_seed(seed)``, and every epoch re-seeds
torch's global RNG (dropout, augmentation) and the data order from ``(seed, epoch)``. The learning
rate is a function of the epoch number. So an epoch depends only on the weights and optimizer state
at its start: two runs on the CPU give identical weights, and a run resumed from the checkpoint of
epoch k continues exactly as if it had never stopped.

Run directory::

    run.json               what was trained on what: config, head config, feature fingerprints
    metrics.jsonl          one JSON line per epoch: epoch, loss, val_accuracy, val_logloss, lr, seconds
    best.safetensors       weights of the best epoch by validation accuracy (last epoch without validation),
                           written after state.json (`repair_best` finishes a commit killed between them)
    ckpt/epoch_NNN.*       weights and optimizer state of the last completed epoch (for resuming)
    state.json             the commit point: last completed epoch, best epoch and its metrics, file hashes

One trainer per run directory: ``train`` and ``fit`` hold the writer lock ``<run_dir>.lock`` (the
store's flock design, `featurestore.store.lock`) for the whole run, so a second trainer into the same
``--out`` is refused at once, naming the first. Every file is written atomically (temp + rename); a
full disk is an `OutputWriteError` naming the file, with the previous epoch's checkpoint intact.

Nothing non-finite is trained on or saved: a batch holding NaN or infinity stops the run with
`NonFiniteInputError` naming the feature set and the clips; a non-finite loss or weights stops it
with `TrainingDivergedError` naming the epoch (and step); the last committed checkpoint stays.

What a GPU needs (tests/heads/test_gpu_ready.py): batches keep the stored dtype (uint8 frames,
float16 embeddings), are cut into pinned memory, copied without blocking and converted on the
device (`DeviceBatches`); a step reads nothing back: the loss is summed, and its first non-finite
step noted, on the device (`LossTally`), and read once per epoch; the weights and optimizer state
are checked for NaN once per epoch, with one read-back per file, and the same bytes are written as
the epoch's checkpoint and the best weights. ``precision="bf16"`` runs the head's forward passes
under bfloat16 autocast (the loss in float32); it is part of the run's config, so it is recorded
in run.json and a run is never resumed in the other precision.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from featurestore._sigint import raise_swallowed
from featurestore.atomic_files import OutputWriteError, atomic_write_bytes, atomic_write_text, describe_os_error
from featurestore.checks import non_finite_rows
from featurestore.encoders import resolve_device
from featurestore.provenance import fingerprint as provenance_fingerprint
from featurestore.provenance import file_sha256, is_random_weights, runtime_info, weights_identity
from featurestore.store.lock import WriterLock, writer_lock
from featurestore.torchdata import Batch, StoreDataset, WorkerLoader
from heads._registry import Head, create_head, head_class
from heads.checkpoint import (
    CheckpointError, NonFiniteWeightsError, check_sha256, load_optimizer, load_weights, non_finite_tensors,
    optimizer_bytes, read_json, read_state, run_file, save_weights, weights_bytes, write_json,
)
from heads.config import ORDER_FIELDS, RESUMABLE_FIELDS, TrainConfig
from heads.evaluate import NonFiniteOutputError, evaluate
from heads.losses import make_loss

EpochCallback = Callable[[int, dict], None]


class NonFiniteInputError(ValueError):
    """A training or validation batch holds NaN or infinity; the message names the feature set and clips."""


class TrainingDivergedError(RuntimeError):
    """The loss or the weights became NaN or infinite; the last committed checkpoint is kept."""


@dataclass
class TrainResult:
    """What a training run produced."""

    run_dir: Path
    best_epoch: int
    best_val_accuracy: float | None
    best_val_logloss: float | None
    epochs_completed: int
    history: list[dict] = field(default_factory=list)
    nothing_to_do: bool = False  # the run had every asked-for epoch already; nothing was built or trained

    @property
    def best_weights(self) -> Path:
        return self.run_dir / "best.safetensors"


# ------------------------------------------------------------------------------- store -> fit
def train(cfg: TrainConfig, store: Any = None, *, overwrite: bool = False,
          on_epoch_end: EpochCallback | None = None) -> TrainResult:
    """Train ``cfg.head`` on stored features and write a run directory (resuming one left unfinished).

    Args:
        cfg: the training configuration.
        store: an open store; None opens ``cfg.store`` read-only.
        overwrite: delete whatever the run directory holds and start afresh (otherwise a directory
            holding the same run is resumed, and one holding a different run is refused).
        on_epoch_end: called with ``(epoch, metrics)`` after each epoch is committed to disk.
    """
    resolve_device(cfg.device)  # a bad or unavailable device fails before any data is read
    check_out_beside_store(cfg.out, store.location if store is not None else cfg.store)
    with run_lock(cfg.out):  # a second trainer into this run directory is refused here, at once
        done = None if overwrite else finished_already(cfg, store)
        if done is not None:  # nothing to train: said in one line, without building the head or loaders
            repair_best(Path(cfg.out), read_state(Path(cfg.out) / "state.json"))
            return done
        return _train_locked(cfg, store, overwrite, on_epoch_end)


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[WriterLock]:
    """Hold the writer lock of a run directory (``<run_dir>.lock``, beside it) for the block.

    Raises:
        StoreLockedError: another process trains into ``run_dir``; the message names it.
        OutputWriteError: the lock file could not be written (disk full, read-only directory).
    """
    lock = writer_lock(Path(run_dir))
    try:
        lock.acquire()
    except OSError as err:  # StoreLockedError is no OSError: it passes through as it is
        raise OutputWriteError(f"could not take the lock {lock.path} of run directory {run_dir}: "
                               f"{describe_os_error(err)}") from err
    try:
        yield lock
    finally:
        lock.release()


def _train_locked(cfg: TrainConfig, store: Any, overwrite: bool, on_epoch_end: EpochCallback | None) -> TrainResult:
    own = store is None
    if own:
        if not cfg.store:
            raise ValueError("no store given: set TrainConfig.store (--store) or pass an open store")
        from featurestore.store import open_store

        store = open_store(cfg.store, mode="r")
    loaders: tuple[Any, ...] = ()
    try:
        head, identity = build_head(cfg, store)
        if any(p.requires_grad for p in head.parameters()):  # (a zero-shot head trains on nothing)
            refuse_shared_val_clips(cfg, store)
        loaders = make_loaders(cfg, store, head, resolve_device(cfg.device))
        return _fit(head, *loaders, cfg, identity, overwrite=overwrite, on_epoch_end=on_epoch_end)
    finally:
        for loader in loaders:
            if isinstance(loader, WorkerLoader):
                loader.close()
        if own:
            store.close()


def refuse_shared_val_clips(cfg: TrainConfig, store: Any) -> None:
    """ValueError where the validation split shares clips with the training split: the best epoch
    would be chosen, and the validation numbers reported, on clips the head trains on (``val_split``
    the training split itself reported accuracy 1.0). ``val_split=None`` keeps the last epoch."""
    train, val, splits = cfg.train_split, cfg.val_split, store.splits()
    if not val or train not in splits or val not in splits:  # (an unknown split: the loaders name it)
        return
    shared = np.flatnonzero(np.asarray(store.column(f"split/{train}"), dtype=bool)
                            & np.asarray(store.column(f"split/{val}"), dtype=bool))
    if len(shared):
        some = [store.clip_ids[i] for i in shared[:3].tolist()]
        raise ValueError(f"val_split {val!r} shares {len(shared)} clip(s) with train_split {train!r} (e.g. {some}): "
                         f"the best epoch would be chosen on clips the head trains on; give a split without "
                         f"them, or no val_split (None: the last epoch is kept)")


def finished_already(cfg: TrainConfig, store: Any = None) -> TrainResult | None:
    """The result of the run in ``cfg.out`` when it has nothing left to train, else None.

    Nothing is left when the run directory holds this run (same training config up to the fields
    a resume may change, and the store's feature sets still have the trained fingerprints) and it
    has ``cfg.epochs`` or more epochs done, or it is a finished head without training. This reads
    two JSON files and the store's feature-set attributes, so a resume with nothing to do returns
    at once; asking for fewer epochs than were done is said in one line. Anything else (another run
    in the directory, features that changed, data other than the run recorded) is None: ``train``
    then resumes or refuses as usual (naming ``data.*``: a finished run of other data is not "done").
    """
    run_dir = Path(cfg.out)
    info_path, state_path = run_dir / "run.json", run_dir / "state.json"
    if not (info_path.is_file() and state_path.is_file()):
        return None
    info, state = read_json(info_path), read_state(state_path)
    done = int(state.get("epoch", 0))
    no_training = bool(state.get("finished")) and state.get("trainable_parameters") == 0
    if (done < cfg.epochs and not no_training) or train_diff(info.get("train", {}), cfg.to_dict(), ORDER_FIELDS):
        return None
    if not _same_inputs(info, cfg, store):
        return None
    best = state.get("best_epoch")
    if no_training:
        _log(f"{run_dir}: {cfg.head} has no trainable parameters and was saved already; nothing to do")
    elif done > cfg.epochs:
        _log(f"{run_dir}: {done} epoch(s) are done already, more than --epochs {cfg.epochs} asks for; nothing "
             f"to train (best epoch {best} stays; --overwrite trains afresh for {cfg.epochs} epoch(s))")
    else:
        _log(f"{run_dir}: all {done} epoch(s) are done already; nothing to train (best epoch {best}; a larger "
             f"--epochs trains on)")
    return TrainResult(run_dir, int(best or 0), state.get("best_val_accuracy"), state.get("best_val_logloss"),
                       done, _read_metrics(run_dir), nothing_to_do=True)


def train_diff(old: dict, new: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """Training-config fields that differ, ignoring those a resume may change (and ``ignore``).

    ``num_workers`` counts (`heads.config.ORDER_FIELDS`): a run resumed with another worker count
    trained its later epochs in another data order, so it ended with weights no run of either
    count gives, while the docs promise a resume ends as an uninterrupted run."""
    return [k for k in new if k not in RESUMABLE_FIELDS and k not in ignore and _canon(old.get(k)) != _canon(new[k])]


def _same_inputs(info: dict, cfg: TrainConfig, store: Any) -> bool:
    """Whether the store's feature sets still have the fingerprints the run was trained on and,
    where the run recorded them, the data versions and split digests (``training_data``): a rerun of
    a finished run after a set was rewritten or a split grew said "nothing to do" and reported the
    old data's metrics as the answer for the store as it is."""
    if store is None:
        if not cfg.store:
            return False
        from featurestore.store import open_store

        with open_store(cfg.store, mode="r") as opened:
            return _same_inputs(info, cfg, opened)
    try:
        found = {name: store.feature_info(name).fingerprint for name in cfg.features}
    except KeyError:  # UnknownFeatureError: train() reports it
        return False
    if found != {name: info.get("features", {}).get(name) for name in cfg.features}:
        return False
    return "data" not in info or _canon(info["data"]) == _canon(training_data(cfg, store))


def build_head(cfg: TrainConfig, store: Any) -> tuple[Head, dict]:
    """The head with input dims from the store, seeded; and the run identity recorded in run.json."""
    infos = [store.feature_info(f) for f in cfg.features]  # raises UnknownFeatureError naming the stored sets
    cls = head_class(cfg.head)
    derived = cls.store_config(infos, len(store.classes))
    _check_overrides(cfg.head, derived, cfg.head_config)
    head_cfg = {**derived, **cfg.head_config}
    torch.manual_seed(cfg.seed)
    head = create_head(cfg.head, **head_cfg)
    class_fp, class_info = _install_class_features(head, store)
    identity = {
        "head": cfg.head,
        "head_config": head.config_dict(),
        "features": {i.name: i.fingerprint for i in infos},
        "class_features": class_fp,
        "feature_info": {**{i.name: _feature_summary(i) for i in infos}, **class_info},
        "feature_provenance": {i.name: _recorded_provenance(i) for i in infos},
        "backbone_weights": head.backbone_weights(),
        "classes": list(store.classes),
        "data": training_data(cfg, store),
        "train": cfg.to_dict(),
    }
    if class_fp:  # zero-shot: prompts of another CLIP model or weights would give meaningless numbers
        from heads.zero_shot import check_towers

        check_towers(identity, cfg.out)
    return head, identity


def training_data(cfg: TrainConfig, store: Any) -> dict:
    """What a run's epochs read beyond the fingerprints: each feature set's data version and a digest
    of each split's clip ids and labels. A fingerprint names how features were computed, not their
    values, so without these a run resumed after a feature set was rewritten (same provenance, other
    values) or clips were appended to a split would train its later epochs on other data, silently."""
    versions = {name: store.data_version(name) for name in cfg.features}
    splits = {}
    for split in dict.fromkeys(s for s in (cfg.train_split, cfg.val_split) if s):
        if split not in store.splits():  # an unknown split: the loaders name it
            continue
        rows = np.flatnonzero(np.asarray(store.column(f"split/{split}"), dtype=bool))
        ids = store.select(split=split)  # the ids of those rows, in row order
        labels = np.asarray(store.labels, dtype=np.int64)[rows]
        splits[split] = hashlib.sha256(json.dumps([ids, labels.tolist()]).encode()).hexdigest()
    return {"data_versions": versions, "splits": splits}


def _check_overrides(name: str, derived: dict, given: dict) -> None:
    for key, value in derived.items():
        if key in given and given[key] != value:
            raise ValueError(f"head {name!r}: head_config sets {key}={given[key]!r} but the store says {value!r}")


def _install_class_features(head: Head, store: Any) -> tuple[dict[str, str], dict[str, dict]]:
    """Give a zero-shot head its stored class-prompt embeddings; ``({name: fingerprint}, {name: summary})``."""
    name = head.class_features
    if name is None:
        return {}, {}
    data, attrs = store.get_class_features(name)
    head.set_class_embeddings(data)
    prov = attrs.get("provenance", {})
    fp = class_features_fingerprint(attrs)
    summary = {"shape": list(data.shape), "encoder": prov.get("encoder"), "modality": "text",
               "random_weights": is_random_weights(prov), "weights_identity": weights_identity(prov)}
    return {name: fp}, {name: summary}


def class_features_fingerprint(attrs: dict) -> str:
    """Fingerprint of a stored class-feature set from its attrs; training records it, prediction compares it."""
    return attrs.get("fingerprint") or provenance_fingerprint(attrs.get("provenance", {}))


def _recorded_provenance(info: Any) -> dict:
    """A feature set's provenance without its runtime section (but with how the encoder was asked
    for, ``runtime.request``, when extraction recorded it): what ``heads classify`` rebuilds the
    encoder from (spec and weights identity, options, preprocessing, segment scheme, stored dtype),
    so a run classifies new files without the store it was trained on."""
    prov = info.provenance or {}
    kept = {k: v for k, v in prov.items() if k != "runtime"}
    request = (prov.get("runtime") or {}).get("request")
    if request:
        kept["runtime"] = {"request": request}
    return kept


def _feature_summary(info: Any) -> dict:
    prov = info.provenance or {}
    config = prov.get("config")
    modality = config.get("modality") if isinstance(config, dict) else None
    return {"shape": list(info.shape[1:]), "encoder": prov.get("encoder"), "modality": modality,
            "random_weights": bool(info.random_weights), "weights_identity": info.weights_identity}


def make_loaders(cfg: TrainConfig, store: Any, head: Head,
                 device: torch.device | None = None) -> tuple[Iterable | None, Iterable | None]:
    """Shuffled segment-level training batches and clip-level validation batches from the store.

    A head without trainable parameters (zero-shot) gets no training loader.

    Args:
        device: the device `fit` trains on: batches then keep the stored dtype and, for CUDA, are cut
            into pinned memory (`fit` converts them on the device). None: float32 batches on the
            host, for callers that feed the head themselves.
    """
    pin = device is not None and device.type == "cuda"
    # with worker processes the DataLoader pins (in this process), not the dataset
    layout = {"keep_dtype": device is not None, "pin_memory": pin and cfg.num_workers == 0}
    batch_size = cfg.batch_size or head.default_batch_size
    trainable = any(p.requires_grad for p in head.parameters())
    n_segments = store.feature_info(cfg.features[0]).n_segments
    train_ds = None
    if trainable:
        train_ds = StoreDataset(store, cfg.features, split=cfg.train_split, level="segment", batch_size=batch_size,
                                shuffle=True, seed=cfg.seed, shuffle_buffer=shuffle_clips(cfg, store, head),
                                cache=cfg.cache, drop_last=True, require_labels=True, **layout)
        # the sample count does not depend on the batch size: clamping it needs no second dataset
        batch_size = train_ds.batch_size = _fit_batch_to_split(cfg, train_ds.n_samples, batch_size)
    val_ds = None
    if cfg.val_split:
        clips_per_batch = max(1, 4 * batch_size // max(1, n_segments))
        val_ds = StoreDataset(store, cfg.features, split=cfg.val_split, level="clip", batch_size=clips_per_batch,
                              require_labels=True, **layout)
    if cfg.num_workers > 0:
        wrap = lambda ds: WorkerLoader(ds, cfg.num_workers, pin_memory=pin) if ds is not None else None  # noqa: E731
        return wrap(train_ds), wrap(val_ds)
    return train_ds, val_ds


def _fit_batch_to_split(cfg: TrainConfig, n_samples: int, batch_size: int) -> int:
    """The batch size to train with: a head's default larger than a small split is cut to the split
    (said on stderr), since a tiny dataset should train without knowing the option; a batch the user
    asked for is never changed: fewer samples than it is an error naming ``--batch-size``."""
    if n_samples == 0:
        raise ValueError(f"split {cfg.train_split!r} has no labelled clips with {', '.join(cfg.features)} done: "
                         f"nothing to train on (choose another --train-split)")
    if n_samples >= batch_size:
        return batch_size
    if cfg.batch_size is not None:
        raise ValueError(f"split {cfg.train_split!r} has {n_samples} training samples, fewer than one batch of "
                         f"{batch_size} (--batch-size): pass --batch-size {n_samples} or less")
    print(f"heads train: note: split {cfg.train_split!r} has {n_samples} training samples, fewer than the head's "
          f"default batch of {batch_size}: training with batches of {n_samples} (--batch-size sets it)",
          file=sys.stderr)
    return n_samples


def shuffle_clips(cfg: TrainConfig, store: Any, head: Head) -> int:
    """Clips per read group (read at once and shuffled together, see ``featurestore.torchdata``): ``cfg.shuffle_buffer``, capped for heads that declare
    ``max_read_group_bytes`` (stored frames: 2048 clips of 448 px frames would be 15 GB per read group)."""
    if not head.max_read_group_bytes:
        return cfg.shuffle_buffer
    per_clip = 0
    for name in cfg.features:
        info = store.feature_info(name)
        per_clip += info.n_segments * int(np.prod(info.feature_shape)) * np.dtype(info.dtype).itemsize
    return max(1, min(cfg.shuffle_buffer, head.max_read_group_bytes // max(1, per_clip)))


# ------------------------------------------------------------------------------- finite inputs
class _WrappedLoader:
    """A loader around ``self.loader``: everything not overridden (``set_epoch``, ``level``, ``len``) is its."""

    loader: Iterable

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)


class FiniteBatches(_WrappedLoader):
    """A loader whose batches are checked for NaN and infinity, naming the clips of any that hold them.

    One ``isfinite`` per floating-point input per batch (integer inputs, stored frames, are always
    finite). When a batch fails, the whole selection of the failing feature set is scanned so the
    message names every affected clip, not only those of one batch. Everything else (``set_epoch``,
    ``level``, ``len``) is the wrapped loader's.
    """

    def __init__(self, loader: Iterable):
        self.loader = loader

    @classmethod
    def wrap(cls, loader: Iterable | None) -> Iterable | None:
        return loader if loader is None or isinstance(loader, cls) else cls(loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            bad = non_finite_tensors(dict(enumerate(batch.inputs)))  # host tensors: no device is waited for
            if bad:
                raise self._error(bad[0], batch, batch.inputs[bad[0]])
            yield batch

    def _error(self, i: int, batch: Any, x: torch.Tensor) -> NonFiniteInputError:
        dataset = getattr(self.loader, "dataset", self.loader)  # a WorkerLoader reads a StoreDataset
        bad_rows = [r for r, bad in zip(batch.rows.tolist(), non_finite_rows(x)) if bad]
        if isinstance(dataset, StoreDataset):
            name = dataset.features[i]
            clips = non_finite_clips(dataset, i) or sorted({dataset.store.clip_ids[int(r)] for r in bad_rows})
            where = f"feature set {name!r} holds NaN or infinity in {len(clips)} clip(s): {_some(clips)}"
        else:
            where = f"input {i} holds NaN or infinity in sample row(s) {_some(sorted({int(r) for r in bad_rows}))}"
        return NonFiniteInputError(f"{where}; training refuses non-finite inputs (a NaN model is never saved): "
                                   f"re-extract those clips or leave them out of the split")


class DeviceBatches(_WrappedLoader):
    """A loader whose batches arrive on ``device`` with float32 inputs (`Batch.to`: non-blocking copies
    in the stored dtype, converted there); validation batches keep their labels on the host, where
    `heads.evaluate` reads them. Everything else is the wrapped loader's, as for `FiniteBatches`."""

    def __init__(self, loader: Iterable, device: torch.device, labels: bool = True):
        self.loader, self.device, self.labels = loader, device, labels

    @classmethod
    def wrap(cls, loader: Iterable | None, device: torch.device, labels: bool = True) -> Iterable | None:
        return None if loader is None else cls(loader, device, labels)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            moved = batch.to(self.device)
            yield moved if self.labels else Batch(moved.inputs, batch.labels, batch.rows, batch.segments)


def non_finite_clips(dataset: StoreDataset, i: int) -> list[str]:
    """Clip ids of the dataset's rows whose stored features of input ``i`` hold NaN or infinity."""
    name, store = dataset.features[i], dataset.store
    if not np.issubdtype(np.dtype(dataset.infos[i].dtype), np.floating):
        return []
    bad: list[int] = []
    for start, stop, local in dataset.blocks:
        block = np.asarray(store.read_rows(name, start, stop, check_done=False))[local]
        bad.extend(int(start + r) for r in local[non_finite_rows(block)])
    ids = store.clip_ids
    return [ids[r] for r in bad]


def _some(items: list[Any], limit: int = 10) -> str:
    shown = ", ".join(str(x) for x in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# ------------------------------------------------------------------------------------ the core
def fit(head: Head, train_loader: Iterable | None, val_loader: Iterable | None, cfg: TrainConfig, identity: dict,
        *, overwrite: bool = False, on_epoch_end: EpochCallback | None = None) -> TrainResult:
    """Train ``head`` for ``cfg.epochs`` epochs into the run directory ``cfg.out``, resuming if it holds
    an unfinished run of the same configuration.

    Raises:
        StoreLockedError: another process trains into ``cfg.out``.
        NonFiniteInputError: a batch holds NaN or infinity (naming the feature set and the clips).
        TrainingDivergedError: the loss or the weights became non-finite (naming the epoch).
        OutputWriteError: a run file could not be written (disk full); the last checkpoint stays.
    """
    with run_lock(cfg.out):
        return _fit(head, train_loader, val_loader, cfg, identity, overwrite=overwrite, on_epoch_end=on_epoch_end)


def _fit(head: Head, train_loader: Iterable | None, val_loader: Iterable | None, cfg: TrainConfig, identity: dict,
         *, overwrite: bool = False, on_epoch_end: EpochCallback | None = None) -> TrainResult:
    """`fit` with the run directory's lock held."""
    run_dir = Path(cfg.out)
    device = resolve_device(cfg.device)
    train_loader = DeviceBatches.wrap(FiniteBatches.wrap(train_loader), device)
    val_loader = DeviceBatches.wrap(FiniteBatches.wrap(val_loader), device, labels=False)
    head.to(device)
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay) if params else None
    state = _open_run_dir(run_dir, identity, overwrite)
    if state.get("epoch", 0) > 0:
        _restore(run_dir, state, head, optimizer)
    else:  # no epoch committed: a line an attempt killed before its first commit left is not history
        _truncate_metrics(run_dir, 0)
    if optimizer is None:
        return _no_training(head, val_loader, cfg, run_dir, device, state)
    if train_loader is None:
        raise ValueError(f"{cfg.head} has trainable parameters but no training loader was given")
    loss_fn = make_loss(cfg.loss, cfg.focal_gamma)
    history = _read_metrics(run_dir)
    for epoch in range(state.get("epoch", 0) + 1, cfg.epochs + 1):
        started = time.perf_counter()
        loss = _train_epoch(head, train_loader, optimizer, loss_fn, cfg, epoch, device)
        record = {"epoch": epoch, "loss": loss, "lr": cfg.lr_at(epoch)}
        if val_loader is not None:
            record.update(_validate(head, val_loader, cfg, epoch, device))
        record["seconds"] = round(time.perf_counter() - started, 3)
        state = _commit_epoch(run_dir, head, optimizer, state, record, cfg)
        history.append(record)
        if cfg.progress:
            _log(_epoch_line(record, cfg.epochs))
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
    return _finish(run_dir, state, cfg, history)


def _validate(head: Head, val_loader: Iterable, cfg: TrainConfig, epoch: int, device: torch.device) -> dict:
    """The epoch's validation metrics; NaN probabilities stop the run as a divergence naming the epoch."""
    try:
        with autocast(cfg.precision, device):
            return evaluate(head, val_loader, device)
    except NonFiniteOutputError as err:
        raise TrainingDivergedError(f"{err} after epoch {epoch}; epoch {epoch} was not saved (the last committed "
                                    f"checkpoint stays): lower --lr, or check the features") from None


def _train_epoch(head: Head, loader: Iterable, optimizer: torch.optim.Optimizer, loss_fn: torch.nn.Module,
                 cfg: TrainConfig, epoch: int, device: torch.device) -> float:
    """One epoch; the mean training loss. The loss is read back once, here at the end (`LossTally`)."""
    torch.manual_seed(cfg.seed * 100_003 + epoch)
    loader.set_epoch(epoch)
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr_at(epoch)
    head.train()
    total = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
    bar = tqdm(total=total, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", disable=not cfg.progress,
               leave=False, dynamic_ncols=True)
    tally = LossTally(device)
    for step, batch in enumerate(loader):
        if step >= total:
            break
        train_step(head, batch, optimizer, loss_fn, tally, cfg.precision)
        bar.update(1)
        raise_swallowed()  # a Ctrl-C dropped in a finalizer (a loader's) stops at this step, not the run's end
    bar.close()
    if tally.seen == 0:
        raise ValueError("the training loader produced no batches")
    mean, bad = tally.result()
    if bad is not None:
        step, value = bad
        raise TrainingDivergedError(f"the training loss became {value} at epoch {epoch}, step {step + 1}; "
                                    f"nothing of this epoch was saved (the last committed checkpoint stays): "
                                    f"lower --lr, or check the features")
    return mean


def train_step(head: Head, batch: Any, optimizer: torch.optim.Optimizer, loss_fn: torch.nn.Module,
               tally: "LossTally", precision: str = "fp32") -> None:
    """Forward, loss, backward and update on a batch already on the head's device; nothing is read back."""
    loss = forward_loss(head, batch, loss_fn, tally, precision)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def forward_loss(head: Head, batch: Any, loss_fn: torch.nn.Module, tally: "LossTally",
                 precision: str = "fp32") -> torch.Tensor:
    """A training step's forward pass and loss (added to ``tally`` on the device)."""
    with autocast(precision, tally.device):
        loss = loss_fn(head(batch.inputs), batch.labels)
    tally.add(loss.detach(), len(batch))
    return loss


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on ``device`` for ``"bf16"``; nothing for ``"fp32"``."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class LossTally:
    """An epoch's loss sum and its first non-finite step, kept on the device and read back once.

    The sum is in float64, as a Python float would be, so the epoch's mean is the same number as
    when each step's loss was read back. A non-finite step does not stop the epoch (that would need
    a read-back per step); the epoch is then refused, naming it, before anything of it is saved.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_value = torch.zeros((), dtype=torch.float64, device=device)
        self.seen = self.steps = 0

    def add(self, loss: torch.Tensor, n: int) -> None:
        value = loss.double()
        self.total += value * n
        new = (self.first_bad < 0) & ~torch.isfinite(value)
        self.first_bad = torch.where(new, self.steps, self.first_bad)
        self.bad_value = torch.where(new, value, self.bad_value)
        self.seen += n
        self.steps += 1

    def result(self) -> tuple[float, tuple[int, float] | None]:
        """``(mean loss, (first non-finite step, its loss) or None)``: the one read-back."""
        total, first, value = torch.stack([self.total, self.first_bad.double(), self.bad_value]).tolist()
        return total / self.seen, (None if first < 0 else (int(first), value))


def _no_training(head: Head, val_loader: Iterable | None, cfg: TrainConfig, run_dir: Path,
                 device: torch.device, state: dict) -> TrainResult:
    """A head without trainable parameters (zero-shot): validate once and save it as epoch 0."""
    if state.get("finished"):
        return _finish(run_dir, state, cfg, _read_metrics(run_dir))
    started = time.perf_counter()
    record: dict[str, Any] = {"epoch": 0, "loss": None, "lr": None}
    if val_loader is not None:
        record.update(evaluate(head, val_loader, device))
    record["seconds"] = round(time.perf_counter() - started, 3)
    save_weights(run_dir / "best.safetensors", head.state_dict(), {"epoch": 0})
    state = {"epoch": 0, "best_epoch": 0, "best_sha256": file_sha256(run_dir / "best.safetensors"),
             "best_val_accuracy": record.get("val_accuracy"),
             "best_val_logloss": record.get("val_logloss"), "finished": True, "trainable_parameters": 0}
    _append_metrics(run_dir, record)
    write_json(run_dir / "state.json", state)
    _log(f"{cfg.head}: no trainable parameters, nothing to train; " + _epoch_line(record, 0))
    return _finish(run_dir, state, cfg, [record])


# ------------------------------------------------------------------------- run directory state
def _open_run_dir(run_dir: Path, identity: dict, overwrite: bool) -> dict:
    """The saved state of a resumable run with the same identity, {} for a new run.

    ``overwrite`` discards whatever the directory holds; otherwise a directory holding a different
    run is refused, and one holding the same run is resumed (or returned as is when finished).
    """
    state_path, info_path = run_dir / "state.json", run_dir / "run.json"
    if overwrite and run_dir.exists():
        _check_replaceable(run_dir)
        shutil.rmtree(run_dir)
    if (run_dir / "sweep.json").is_file():  # both commands default to runs/run
        raise FileExistsError(f"--out {str(run_dir)!r} is a `heads sweep` directory (it holds sweep.json), not a run "
                              f"directory; choose another --out")
    if info_path.exists():
        recorded = read_json(info_path)
        diff = _identity_diff(recorded, identity)
        if diff:
            workers = (recorded.get("train") or {}).get("num_workers")
            hint = (f" (the worker count sets a run's data order: resume with --num-workers {workers})"
                    if "train.num_workers" in diff else "")
            raise FileExistsError(f"run directory {str(run_dir)!r} holds a different run (differs in: "
                                  f"{', '.join(diff)}){hint}; choose another --out or pass --overwrite")
    (run_dir / "ckpt").mkdir(parents=True, exist_ok=True)
    if not info_path.exists():
        write_json(info_path, {**identity, "created": runtime_info()})
        return {}
    if not state_path.exists():
        return {}
    state = read_state(state_path)
    repair_best(run_dir, state)
    return state


def check_out_beside_store(out: str | Path, store: Any) -> None:
    """Refuse an ``--out`` that is a local store or lies inside it (``--out`` and ``--store`` mixed
    up): the run's files would be written among the store's, and ``--overwrite`` would delete it."""
    location = str(store or "")
    if not location or ("://" in location and not location.startswith("file://")):
        return
    kept, run = Path(location.removeprefix("file://")).resolve(), Path(out).resolve()
    if run == kept or kept in run.parents:
        raise FileExistsError(f"--out {str(out)!r} is {'the store' if run == kept else 'inside the store'} "
                              f"{location}; a run directory belongs beside the store, not in it")


#: What a run directory holds before its run.json is written (a run killed at its start) or beside it.
RUN_ENTRIES = frozenset({"run.json", "state.json", "best.safetensors", "metrics.jsonl", "ckpt"})


def _check_replaceable(run_dir: Path) -> None:
    """Refuse ``--overwrite`` of a directory that is not a run's: it is deleted whole, so ``--out .``
    or ``--out`` naming the folder of the store or a dataset would delete them (a run directory has
    ``run.json``, or only a run's own entries when it was killed before writing it)."""
    if run_dir.is_symlink() or not run_dir.is_dir():
        what = "a symbolic link (give the run directory's own path)" if run_dir.is_symlink() else "not a directory"
        raise FileExistsError(f"--out {str(run_dir)!r} is {what}; --overwrite replaces only a run directory")
    entries = sorted(p.name for p in run_dir.iterdir())
    if "run.json" not in entries and not set(entries) <= RUN_ENTRIES:
        raise FileExistsError(f"--out {str(run_dir)!r} is not a run directory (no run.json; it holds "
                              f"{', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}), and --overwrite "
                              f"would delete it whole; choose another --out")


#: run.json keys that are not part of a run's identity: ``feature_provenance`` is documentation the
#: fingerprints in ``features`` already cover (and runs made before it was recorded lack it).
_NOT_IDENTITY = ("train", "created", "feature_provenance")
#: identity keys that runs made before they were recorded lack: such a run still resumes (unchecked).
_RECORDED_LATER = ("data",)


def _identity_diff(old: dict, new: dict) -> list[str]:
    """Top-level (and train-config) keys that differ, ignoring fields that may change on resume."""
    diff = [k for k in new if k not in _NOT_IDENTITY and _canon(old.get(k)) != _canon(new[k])
            and not (k in _RECORDED_LATER and k not in old)]
    diff += [f"train.{k}" for k in train_diff(old.get("train", {}), new.get("train", {}))]
    return [part for key in diff for part in (data_diff(old, new) if key == "data" else [key])]


def data_diff(old: dict, new: dict) -> list[str]:
    """``data.<kind>.<name>`` for each feature set or split whose recorded data changed (else ``data``)."""
    was, now = old.get("data") or {}, new.get("data") or {}
    parts = [f"data.{kind}.{name}" for kind in now for name in sorted({*(was.get(kind) or {}), *now[kind]})
             if (was.get(kind) or {}).get(name) != now[kind].get(name)]
    return parts or ["data"]


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _restore(run_dir: Path, state: dict, head: Head, optimizer: torch.optim.Optimizer | None) -> None:
    """Load the committed epoch's weights and optimizer state, each checked against ``state.json``:
    its hash (a damaged or replaced file) and, for the weights, the epoch stamped in the file (an
    edited ``epoch`` resumed epoch 1's weights as epoch 2's and skipped an epoch, silently)."""
    path = run_file(run_dir, state["checkpoint"])
    check_sha256(path, state.get("checkpoint_sha256"))  # a damaged checkpoint never resumes silently
    weights, metadata = load_weights(path)
    stamped = metadata.get("epoch")
    if stamped is not None and stamped != str(state["epoch"]):
        raise CheckpointError(f"{path} holds the weights of epoch {stamped} but {run_dir / 'state.json'} says epoch "
                              f"{state['epoch']} is committed: the run's files do not belong together (state.json "
                              f"edited or copied); train the run again (--overwrite)")
    head.load_state_dict(weights)
    if optimizer is not None:
        optim_path = run_file(run_dir, state["optimizer"])
        check_sha256(optim_path, state.get("optimizer_sha256"))  # momentum of another epoch or run: refused
        load_optimizer(optim_path, optimizer)
    _truncate_metrics(run_dir, state["epoch"])


def repair_best(run_dir: Path, state: dict) -> None:
    """Finish a commit killed between ``state.json`` and ``best.safetensors``: when the committed
    best epoch is the last one, its checkpoint holds the same bytes, so ``best.safetensors`` is
    rewritten from it if it is missing or not those bytes (anything else is left for loading to refuse)."""
    best, sha = run_dir / "best.safetensors", state.get("best_sha256")
    if not isinstance(sha, str) or sha != state.get("checkpoint_sha256") or "checkpoint" not in state:
        return
    if best.is_file() and file_sha256(best) == sha:
        return
    ckpt = run_file(run_dir, state["checkpoint"])
    if ckpt.is_file() and file_sha256(ckpt) == sha:
        atomic_write_bytes(best, ckpt.read_bytes())


def _commit_epoch(run_dir: Path, head: Head, optimizer: torch.optim.Optimizer, state: dict, record: dict,
                  cfg: TrainConfig) -> dict:
    """Save the epoch's checkpoint, then the metrics line, then state.json (the commit), then the best weights."""
    epoch = record["epoch"]
    weights, optim = _epoch_files(head, optimizer, epoch)
    best_acc = state.get("best_val_accuracy")
    acc = record.get("val_accuracy")
    improved = epoch == 1 or state.get("best_epoch") is None or (acc is None or best_acc is None or acc > best_acc)
    stem = f"ckpt/epoch_{epoch:03d}"
    sha = hashlib.sha256(weights).hexdigest()  # loaders check it: safetensors carries no checksum
    atomic_write_bytes(run_dir / f"{stem}.safetensors", weights)
    atomic_write_bytes(run_dir / f"{stem}.optim.safetensors", optim)
    new_state = {
        "epoch": epoch, "checkpoint": f"{stem}.safetensors", "optimizer": f"{stem}.optim.safetensors",
        "checkpoint_sha256": sha, "optimizer_sha256": hashlib.sha256(optim).hexdigest(),
        "best_sha256": sha if improved else state.get("best_sha256"),
        "best_epoch": epoch if improved else state["best_epoch"],
        "best_val_accuracy": acc if improved else best_acc,
        "best_val_logloss": record.get("val_logloss") if improved else state.get("best_val_logloss"),
        "finished": epoch >= cfg.epochs,
        "trainable_parameters": sum(p.numel() for p in head.parameters() if p.requires_grad),
    }
    _append_metrics(run_dir, record)  # before the commit: a resume drops lines of uncommitted epochs
    write_json(run_dir / "state.json", new_state)
    if improved:  # after the commit, so a kill never leaves an uncommitted epoch's weights as the best (repair_best)
        atomic_write_bytes(run_dir / "best.safetensors", weights)  # the same bytes: checked and serialised once
    for old in (run_dir / "ckpt").glob("epoch_*"):
        if not old.name.startswith(f"epoch_{epoch:03d}."):
            old.unlink()
    return new_state


def _epoch_files(head: Head, optimizer: torch.optim.Optimizer, epoch: int) -> tuple[bytes, bytes]:
    """The epoch's weights and optimizer state as safetensors files, or `TrainingDivergedError` when
    either holds NaN or infinity: every tensor is checked once (`heads.checkpoint.weights_bytes`)."""
    files, bad = [], []
    for prefix, make in (("", lambda: weights_bytes(head.state_dict(), {"epoch": epoch})),
                         ("optimizer.", lambda: optimizer_bytes(optimizer))):
        try:
            files.append(make())
        except NonFiniteWeightsError as err:
            bad += [prefix + name.partition(".")[2] if prefix else name for name in err.names]
    if bad:
        raise TrainingDivergedError(f"the weights became NaN or infinite in epoch {epoch} ({', '.join(bad[:3])}"
                                    f"{' ...' if len(bad) > 3 else ''}); epoch {epoch} was not saved (the last "
                                    f"committed checkpoint stays): lower --lr, or check the features")
    return files[0], files[1]


def _finish(run_dir: Path, state: dict, cfg: TrainConfig, history: list[dict]) -> TrainResult:
    result = TrainResult(run_dir, int(state.get("best_epoch") or 0), state.get("best_val_accuracy"),
                         state.get("best_val_logloss"), int(state.get("epoch", 0)), history)
    acc = "n/a" if result.best_val_accuracy is None else f"{result.best_val_accuracy:.4f}"
    best = run_dir / "best.safetensors"
    if not best.is_file():  # --epochs 0 on a head with trainable parameters: no weights to point at
        _log(f"{cfg.head}: {result.epochs_completed} epoch(s) done; no weights saved in {run_dir} (train at least "
             f"one epoch: --epochs N resumes it)")
        return result
    _log(f"{cfg.head}: {result.epochs_completed} epoch(s) done; best epoch {result.best_epoch} "
         f"(val_accuracy {acc}) -> {best}")
    return result


def _append_metrics(run_dir: Path, record: dict) -> None:
    """Add an epoch's line by rewriting the (small) file atomically: a full disk never leaves half a line.
    Lines of this epoch or later go: an attempt killed between its metrics line and its state.json left
    one (never committed), and a run that restarted from no committed epoch had it read back twice."""
    kept = [r for r in _read_metrics(run_dir) if r["epoch"] < record["epoch"]]
    _write_metrics(run_dir, [*kept, record])


def _write_metrics(run_dir: Path, records: list[dict]) -> None:
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def _read_metrics(run_dir: Path) -> list[dict]:
    """The epochs' records; `CheckpointError` naming the file and line when one is not an epoch's record
    (a damaged file was a bare JSONDecodeError or ``KeyError: 'epoch'`` on resume)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
            raise CheckpointError(f"{path}, line {number}: not JSON ({type(err).__name__}: {str(err)[:120]}); the "
                                  f"run's files are damaged: train the run again (--overwrite)") from None
        if not isinstance(record, dict) or type(record.get("epoch")) is not int:
            shown = line[:80].decode(errors="replace")
            raise CheckpointError(f"{path}, line {number}: expected an epoch's record (an object with an integer "
                                  f"'epoch'), found {shown!r}; the run's files are damaged: train the run again "
                                  f"(--overwrite)")
        records.append(record)
    return records


def _truncate_metrics(run_dir: Path, epoch: int) -> None:
    """Drop metric lines of epochs after the last committed checkpoint (written before a crash)."""
    records = _read_metrics(run_dir)
    kept = [r for r in records if r["epoch"] <= epoch]
    if len(kept) < len(records):
        _write_metrics(run_dir, kept)


def _epoch_line(record: dict, epochs: int) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}"]
    for key in ("loss", "val_accuracy", "val_logloss", "lr", "seconds"):
        value = record.get(key)
        if value is not None:
            parts.append(f"{key} {value:.4g}")
    return " ".join(parts)


def _log(line: str) -> None:
    """One summary line on stderr (through tqdm so it does not break a progress bar), so that stdout
    holds only what the command prints as its result (``heads train --json``)."""
    tqdm.write(line, file=sys.stderr)

