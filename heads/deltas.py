"""Delta features in torch, numerically compatible with ``librosa.feature.delta`` (mode ``"interp"``).

Deltas are not stored (they are a cheap function of the stored log-mel), so they are computed per
batch on the training device. ``librosa.feature.delta(S, width, order)`` is a Savitzky-Golay filter
with ``polyorder = deriv = order``; in ``"interp"`` mode the edge values come from the polynomial fitted
to the first/last ``width`` frames, whose ``order``-th derivative is constant, so the edges equal the
first/last interior value. That gives: a valid 1-D convolution plus replicate padding.

A head keeps the weights of both deltas as one buffer (`delta_kernels`, moved with the module), so a
forward pass builds no tensor on the host and copies none to the device: `with_deltas` computes the
delta and the delta-delta in one two-channel convolution.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F


def savgol_derivative_coeffs(width: int, order: int) -> torch.Tensor:
    """Weights ``w`` such that ``sum_k w[k] * x[t + k - width//2]`` is the ``order``-th derivative at ``t``.

    They are the least-squares polynomial (degree ``order``) fit over the window, differentiated
    ``order`` times: row ``order`` of the Vandermonde pseudo-inverse times ``order!``.
    """
    _check(width, order)
    return torch.tensor(_coeffs(width, order), dtype=torch.float64)


@lru_cache(maxsize=None)
def _coeffs(width: int, order: int) -> tuple[float, ...]:
    """The weights as plain floats, computed once per ``(width, order)``: a fresh tensor is made
    from them per call, so no cached tensor carries inference-mode or device state into training."""
    half = width // 2
    k = np.arange(-half, half + 1, dtype=np.float64)
    vander = np.stack([k ** p for p in range(order + 1)], axis=1)  # [width, order + 1]
    return tuple(float(v) for v in np.linalg.pinv(vander)[order] * math.factorial(order))


def delta(x: torch.Tensor, width: int = 9, order: int = 1) -> torch.Tensor:
    """``order``-th delta of ``x`` along its last axis (time), like ``librosa.feature.delta``.

    Args:
        x: ``[..., time]`` tensor; time must be at least ``width`` (librosa refuses shorter input too).
        width: odd window length >= 3 (librosa's default is 9).
        order: derivative order (1 = delta, 2 = delta-delta as librosa defines it).
    """
    _check(width, order)
    steps = x.shape[-1]
    if steps < width:
        raise ValueError(f"delta width {width} exceeds the {steps} time steps of the input")
    w = savgol_derivative_coeffs(width, order).to(dtype=x.dtype, device=x.device)
    flat = x.reshape(-1, 1, steps)
    out = F.conv1d(flat, w.view(1, 1, -1))  # cross-correlation: w[k] multiplies x[t + k]
    half = width // 2
    out = F.pad(out, (half, half), mode="replicate")
    return out.reshape(x.shape)


def delta_kernels(width: int = 9) -> torch.Tensor:
    """``[2, 1, width]`` float32 weights of the delta and the delta-delta: `with_deltas`'s ``kernels``."""
    for order in (1, 2):
        _check(width, order)
    # one tensor from the floats (not torch.stack: built on the meta device, as a run's shapes are
    # checked, a stack goes through a decomposition that imports torch._dynamo, ~1.4 s a process)
    return torch.tensor([_coeffs(width, order) for order in (1, 2)], dtype=torch.float32).unsqueeze(1)


def with_deltas(logmel: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """``[B, mels, time]`` -> ``[B, 3, mels, time]``: log-mel, delta and delta-delta as image channels.

    Args:
        logmel: the log-mel batch; time must be at least the kernels' width.
        kernels: `delta_kernels` of the wanted width, on ``logmel``'s device (a head's buffer).
    """
    b, mels, steps = logmel.shape
    width = kernels.shape[-1]
    if steps < width:
        raise ValueError(f"delta width {width} exceeds the {steps} time steps of the input")
    out = F.conv1d(logmel.reshape(-1, 1, steps), kernels.to(logmel.dtype))  # [B * mels, 2, steps - width + 1]
    half = width // 2
    out = F.pad(out, (half, half), mode="replicate").view(b, mels, 2, steps)
    return torch.cat([logmel.unsqueeze(1), out.permute(0, 2, 1, 3)], dim=1)


def _check(width: int, order: int) -> None:
    if width < 3 or width % 2 != 1:
        raise ValueError(f"width must be an odd integer >= 3, got {width}")
    if order < 1:
        raise ValueError(f"order must be a positive integer, got {order}")
