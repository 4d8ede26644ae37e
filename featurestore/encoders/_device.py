"""Which torch device a model runs on: ``"auto"``, ``"cpu"``, ``"cuda[:n]"`` resolved, or refused.

``DEVICE_HELP`` (the ``--device`` help text) lives torch-free in ``featurestore._devices`` and is
re-exported here and from ``featurestore.encoders``.
"""
from __future__ import annotations

import torch

from featurestore._devices import DEVICE_HELP  # noqa: F401 - re-exported by featurestore.encoders


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto"`` / ``"cpu"`` / ``"cuda[:n]"`` / a ``torch.device`` into a usable device.

    ``"auto"`` (and None) picks CUDA when a GPU is visible, else the CPU, so the same command line
    works on a laptop and on a GPU box. Asking for CUDA where there is none is an error rather than
    a silent fallback, because a 50x slower extraction should not happen by accident.
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a device: expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if resolved.type == "cpu":
        return resolved
    backend = getattr(torch, resolved.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    if not _available(backend):
        raise ValueError(f"device {device!r} was requested but {resolved.type.upper()} is not available here; "
                         f"use 'cpu' or 'auto'")
    count = _device_count(backend)
    if resolved.index is not None and count and resolved.index >= count:  # 0 next to "available": cannot tell
        raise ValueError(f"device {device!r} was requested but this machine has {count} {resolved.type.upper()} "
                         f"device(s), numbered from 0; use one of them, 'cpu' or 'auto'")
    return resolved


def _available(backend: object) -> bool:
    """Whether torch's module for a device type says it can run here (False when there is none:
    ``meta``, or a type this build has no module for)."""
    check = getattr(backend, "is_available", None)
    try:
        return bool(check()) if callable(check) else False
    except Exception:  # noqa: BLE001 - a backend that cannot even answer is not available
        return False


def _device_count(backend: object) -> int | None:
    """How many devices of that type torch sees, or None when it cannot say."""
    count = getattr(backend, "device_count", None)
    try:
        return int(count()) if callable(count) else None
    except Exception:  # noqa: BLE001
        return None
