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
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available here; use 'cpu' or 'auto'")
    return resolved
