"""Checkpoint files: weights and optimizer state as safetensors, everything else as JSON, written atomically.

Every file goes through `featurestore.atomic_files` (a temp name beside it, then one rename), so a
run killed mid-write, or stopped by a full disk or a file-size limit, leaves the previous checkpoint
intact; a write that fails is an `OutputWriteError` naming the file. Files follow the process's
umask (safetensors' own ``save_file`` makes them 0600, which hides a run from a teammate).
``state.json`` is the commit point of an epoch (only ``best.safetensors``, a copy of the committed
checkpoint, follows it). Weights that are not finite are
never written: a NaN model is refused here whatever asked for it (`weights_bytes` checks every tensor
once, with one read-back for all of them, and the trainer writes the same bytes as the epoch's
checkpoint and as the best weights).

A run's files are read with their sizes checked before anything is allocated: `stored_shapes` reads
only a safetensors header, so a crafted ``run.json`` cannot make a loader build a huge model first.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from featurestore.atomic_files import atomic_write_bytes, atomic_write_text
from featurestore.provenance import file_sha256


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename); `OutputWriteError` naming ``path`` if it cannot."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def read_json(path: Path) -> Any:
    """The JSON in ``path``; `CheckpointError` naming the file when it is not JSON (a truncated or
    overwritten run file), since the decoder's own message names only a line and column."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path} is not valid JSON ({type(err).__name__}: {str(err)[:200]}); the run's "
                              f"files are damaged: train the run again (or restore the file)") from None


def read_json_object(path: Path, required: Mapping[str, type | tuple[type, ...]]) -> dict:
    """``read_json(path)``, refused unless it is an object whose ``required`` keys have those types."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    for key, kinds in required.items():
        if not isinstance(data.get(key), kinds):
            raise CheckpointError(f"{path}: {key!r} should be {_kind_names(kinds)}, found "
                                  f"{'nothing' if key not in data else type(data[key]).__name__}")
    return data


#: ``state.json`` keys read on resume and load, with their types (an epoch > 0 also needs its files).
STATE_KEYS: dict[str, type | tuple[type, ...]] = {
    "epoch": int, "best_epoch": (int, type(None)), "best_val_accuracy": (int, float, type(None)),
    "best_val_logloss": (int, float, type(None)), "finished": (bool, type(None)),
}


def read_state(path: Path) -> dict:
    """A run's ``state.json``, checked to hold what resuming and loading read, of the right kinds.

    An edited or foreign file was an ``AttributeError``/``TypeError``/``KeyError`` deep in the
    trainer; now it is one `CheckpointError` naming the file and the key.
    """
    state = read_json_object(path, {k: v for k, v in STATE_KEYS.items() if k == "epoch"})
    for key, kinds in {**STATE_KEYS, "checkpoint": str, "optimizer": str}.items():
        wrong = key in state and (not isinstance(state[key], kinds) or (kinds is int and isinstance(state[key], bool)))
        if wrong:
            raise CheckpointError(f"{path}: {key!r} should be {_kind_names(kinds)}, found {state[key]!r:.80}")
    if state["epoch"] < 0:
        raise CheckpointError(f"{path}: 'epoch' should be >= 0, found {state['epoch']}")
    missing = [k for k in ("checkpoint", "optimizer") if state["epoch"] > 0 and k not in state]
    if missing:
        raise CheckpointError(f"{path}: epoch {state['epoch']} is committed but {' and '.join(map(repr, missing))} "
                              f"{'is' if len(missing) == 1 else 'are'} missing; the run's files are damaged: "
                              f"train the run again (--overwrite)")
    return state


def _kind_names(kinds: type | tuple[type, ...]) -> str:
    names = {str: "a string", dict: "an object", list: "a list", int: "an integer", float: "a number",
             bool: "true or false", type(None): "null"}
    return " or ".join(names.get(k, k.__name__) for k in (kinds if isinstance(kinds, tuple) else (kinds,)))


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A module's state dict as safetensors (tensors moved to the CPU, made contiguous), atomically.

    Raises:
        NonFiniteWeightsError: a tensor holds NaN or infinity (nothing is written).
        OutputWriteError: the file could not be written (the previous one stays).
    """
    atomic_write_bytes(path, weights_bytes(state_dict, metadata, str(path)))


def weights_bytes(state_dict: Mapping[str, torch.Tensor], metadata: dict[str, Any] | None = None,
                  what: str = "weights") -> bytes:
    """The safetensors file of ``state_dict`` (moved to the CPU, contiguous), refused if not finite.

    Raises:
        NonFiniteWeightsError: a tensor holds NaN or infinity; ``what`` names the file in the message.
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    bad = non_finite_tensors(tensors)
    if bad:
        raise NonFiniteWeightsError(f"refusing to write {what}: tensor(s) {', '.join(bad[:5])}"
                                    f"{' ...' if len(bad) > 5 else ''} hold NaN or infinity", bad)
    return safetensors_bytes(tensors, metadata={k: str(v) for k, v in (metadata or {}).items()})


def non_finite_tensors(tensors: Mapping[Any, torch.Tensor]) -> list[Any]:
    """Keys of the floating-point tensors holding NaN or infinity (integer tensors are always finite).

    The one NaN check of heads (weights, optimizer state, input batches): a reduction per tensor and
    one read-back for all of them, so a device is waited for once, not once per tensor.
    """
    named = [(key, t) for key, t in tensors.items() if t.is_floating_point() or t.is_complex()]
    if not named:
        return []
    device = named[0][1].device
    finite = torch.stack([_all_finite(t).to(device, non_blocking=True) for _, t in named]).tolist()
    return [key for (key, _), ok in zip(named, finite) if not ok]


#: Sum dtypes in which a sum of finite terms cannot overflow, so the sum is finite iff every term is:
#: one reduction instead of isfinite's several passes (float16 max 65504: float32 holds 1e33 of them).
_EXACT_SUM = {torch.float16: torch.float32, torch.bfloat16: torch.float64, torch.float32: torch.float64}


def _all_finite(t: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor: whether ``t`` holds no NaN or infinity (not read back)."""
    wide = _EXACT_SUM.get(t.dtype)
    return torch.isfinite(t.sum(dtype=wide)) if wide is not None else torch.isfinite(t).all()


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state_dict, metadata)`` of a safetensors file, refused when a tensor is not finite.

    The trainer never writes NaN, but a file from elsewhere (or of a run whose ``state.json`` is
    gone, so no hash is compared) may hold it: loaded, it predicted NaN for every clip, or resumed
    training from NaN and was reported as a divergence of the next epoch.

    Raises:
        CheckpointError: not a readable safetensors file.
        NonFiniteWeightsError: a tensor holds NaN or infinity (a failure, as training's divergence is).
    """
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors, metadata = {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}
    except Exception as err:  # noqa: BLE001 - safetensors' own errors do not name the file
        raise _unreadable(path, err) from None
    bad = non_finite_tensors(tensors)
    if bad:
        raise NonFiniteWeightsError(f"checkpoint {str(path)!r} holds NaN or infinity in tensor(s) "
                                    f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; the trainer never writes "
                                    f"such weights: the file is damaged or not a trained run's", bad)
    return tensors, metadata


class CheckpointError(ValueError):
    """A run's checkpoint file is not what the trainer writes (safetensors + JSON)."""


class NonFiniteWeightsError(RuntimeError):
    """Weights or optimizer state hold NaN or infinity, so they are not written (training diverged)."""

    def __init__(self, message: str, names: list[str] | None = None):
        super().__init__(message)
        self.names = list(names or [])  # the non-finite tensors


def stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of a safetensors file, from its header alone (no tensor is read).

    safetensors checks that the header's offsets cover exactly the bytes the file has, so shapes
    that pass here describe data that is really on disk.
    """
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(int(n) for n in f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors' own errors do not name the file
        raise _unreadable(path, err) from None


def check_shapes(path: Path, expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Refuse a weights file whose tensor names or shapes are not ``expected`` (``what`` builds them).

    Called before the module is built for real, so a config that claims a huge model costs nothing.
    """
    found = stored_shapes(path)
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = [f"{k} {list(found[k])} (expected {list(expected[k])})" for k in sorted(set(found) & set(expected))
             if tuple(found[k]) != tuple(expected[k])]
    if not (missing or extra or wrong):
        return
    parts = ([f"shape of {', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}"] if wrong else []) + \
        ([f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"] if missing else []) + \
        ([f"unexpected {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}"] if extra else [])
    raise CheckpointError(f"checkpoint {str(path)!r} does not fit {what}: {'; '.join(parts)}; the run's files "
                          f"do not belong together (run.json edited, or weights from another run)")


def _unreadable(path: Path, err: Exception) -> CheckpointError:
    return CheckpointError(f"checkpoint {str(path)!r} is not a readable safetensors file "
                           f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); heads "
                           f"read weights as safetensors only, never pickles")


def check_sha256(path: Path, recorded: Any) -> None:
    """Refuse a weights file whose sha256 is not the one training recorded in ``state.json``.

    safetensors carries no checksum: a flipped bit in a tensor's bytes loads as slightly other
    weights, and a file copied over from another run loads as that run. Files of runs trained before
    the hash was recorded (``recorded`` None) are not checked.

    Raises:
        CheckpointError: naming the file and both hashes.
    """
    if not isinstance(recorded, str):
        return
    found = file_sha256(path)
    if found != recorded:
        raise CheckpointError(f"checkpoint {str(path)!r} is not the file training wrote (sha256 {found[:12]}..., "
                              f"state.json records {recorded[:12]}...): it is damaged or was replaced; restore it "
                              f"or train the run again")


def run_file(run_dir: Path, name: str) -> Path:
    """``run_dir / name`` for a file name recorded in a run's JSON, refused if it leads out of the run."""
    path = (run_dir / name).resolve()
    if Path(name).is_absolute() or not path.is_relative_to(run_dir.resolve()):
        raise CheckpointError(f"{run_dir}: state.json names checkpoint {name!r}, outside the run directory")
    return path


def save_optimizer(path: Path, optimizer: torch.optim.Optimizer) -> None:
    """Optimizer state: per-parameter tensors in safetensors, param groups as JSON metadata."""
    atomic_write_bytes(path, optimizer_bytes(optimizer, str(path)))


def optimizer_bytes(optimizer: torch.optim.Optimizer, what: str = "optimizer state") -> bytes:
    """`save_optimizer`'s file as bytes (`NonFiniteWeightsError` when a state tensor is not finite)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, slots in state["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return weights_bytes(tensors, {"param_groups": json.dumps(state["param_groups"]),
                                   "scalars": json.dumps(scalars)}, what)


def load_optimizer(path: Path, optimizer: torch.optim.Optimizer) -> None:
    """Restore what `save_optimizer` wrote into an optimizer over the same parameters."""
    tensors, metadata = load_weights(path)
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, _, key = name.partition(".")
        state.setdefault(int(idx), {})[key] = value
    for name, value in json.loads(metadata.get("scalars", "{}")).items():
        idx, _, key = name.partition(".")
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
