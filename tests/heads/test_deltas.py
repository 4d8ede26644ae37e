"""Training-time deltas match librosa.feature.delta (the reference is used in this test only)."""
from __future__ import annotations

import librosa
import numpy as np
import pytest
import torch

from heads.deltas import delta, delta_kernels, with_deltas


@pytest.fixture(autouse=True, scope="module")
def _librosa_compiled_once(librosa_compiled):
    """librosa's numba compilation, one test process at a time (tests/conftest.py)."""


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("width", [9, 5])
def test_delta_matches_librosa(order, width):
    x = np.random.default_rng(order + width).normal(size=(3, 16, 94)) * 20 - 40
    expected = librosa.feature.delta(x, width=width, order=order, axis=-1)
    got = delta(torch.from_numpy(x), width=width, order=order).numpy()
    assert np.allclose(got, expected, atol=1e-9)


def test_with_deltas_stacks_three_channels():
    x = torch.randn(2, 8, 20)
    out = with_deltas(x, delta_kernels())
    assert out.shape == (2, 3, 8, 20) and torch.equal(out[:, 0], x)
    torch.testing.assert_close(out[:, 1], delta(x, 9, 1), atol=1e-5, rtol=0)
    assert torch.allclose(out[:, 2].double(), torch.from_numpy(librosa.feature.delta(x.numpy(), order=2)).double(),
                          atol=1e-4)


def test_delta_rejects_bad_widths_and_short_input():
    with pytest.raises(ValueError, match="odd"):
        delta(torch.zeros(1, 20), width=4)
    with pytest.raises(ValueError, match="exceeds"):
        delta(torch.zeros(1, 5), width=9)
    with pytest.raises(ValueError, match="exceeds"):
        with_deltas(torch.zeros(1, 4, 5), delta_kernels(9))


def test_delta_kernels_are_the_savgol_weights_and_build_on_the_meta_device():
    """A run's shapes are checked on a head built on the meta device: the kernels build there too."""
    from heads.deltas import savgol_derivative_coeffs

    expected = torch.stack([savgol_derivative_coeffs(7, order).float() for order in (1, 2)]).unsqueeze(1)
    assert torch.equal(delta_kernels(7), expected) and delta_kernels(7).dtype == torch.float32
    with torch.device("meta"):
        kernels = delta_kernels(7)
    assert kernels.is_meta and kernels.shape == (2, 1, 7)
    with pytest.raises(ValueError, match="odd"):
        delta_kernels(6)
