"""Checkpoint files: weights and optimizer state as safetensors, everything else as JSON, written atomically.

Every file is written to a temporary name and renamed, so a run killed mid-write leaves the previous
checkpoint intact; ``state.json`` is written last and is the commit point of an epoch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from safetensors import safe_open


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A module's state dict as safetensors (tensors moved to the CPU, made contiguous)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state_dict, metadata)`` of a safetensors file."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}
    except Exception as err:  # noqa: BLE001 - safetensors' own errors do not name the file
        raise CheckpointError(f"checkpoint {str(path)!r} is not a readable safetensors file "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); heads "
                              f"read weights as safetensors only, never pickles") from None


class CheckpointError(ValueError):
    """A run's checkpoint file is not what the trainer writes (safetensors + JSON)."""


def run_file(run_dir: Path, name: str) -> Path:
    """``run_dir / name`` for a file name recorded in a run's JSON, refused if it leads out of the run."""
    path = (run_dir / name).resolve()
    if Path(name).is_absolute() or not path.is_relative_to(run_dir.resolve()):
        raise CheckpointError(f"{run_dir}: state.json names checkpoint {name!r}, outside the run directory")
    return path


def save_optimizer(path: Path, optimizer: torch.optim.Optimizer) -> None:
    """Optimizer state: per-parameter tensors in safetensors, param groups as JSON metadata."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, slots in state["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    save_weights(path, tensors, {"param_groups": json.dumps(state["param_groups"]),
                                 "scalars": json.dumps(scalars)})


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
