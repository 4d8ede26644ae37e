"""The paper's post-processing, equation (1): a step clamp applied to every probability.

    f(x) = 0.001  for 0    < x <= 0.06
           0.06   for 0.06 < x <= 0.20
           x      for 0.20 < x <= 0.70
           0.99   for 0.70 < x <= 1.0

Decisions the paper leaves open, made here and documented in docs/fusion.md:

* ``x == 0`` is not covered by the paper's cases. We map it to 0.001 like the rest of the lowest
  band: the stated aim is to avoid extreme confidences, and leaving 0 would keep an infinite loss.
* Rows no longer sum to one afterwards (a confident row becomes 0.99 + 9 x 0.001 = 0.999; a row
  with two values in (0.2, 0.7] can exceed one). We do not renormalise by default (the paper does
  not); ``renormalize=True`` is available. The metric's own ``renormalize`` flag decides how the
  unnormalised rows are scored (see :mod:`fusion.metrics`).
* Ties: a band maps all its values to one number, so a flat row (every class <= 0.2) comes out with
  tied maxima, and an arg-max of it takes the first tied class in class order (numpy's rule), not the
  class ranked first before the clamp. The paper does not say; docs/fusion.md tells where the
  pre-clamp ranking is reported.
* The band edges and values are parameters (:class:`ClampBands`), the paper's by default.
* Edges are compared at float32 precision, the precision prediction runs are stored in, so that a
  stored 0.2 (0.200000003 once read) is "0.20" as written: in the 0.06 band, as a float64 0.2 is.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fusion._validate import as_probs


@dataclass(frozen=True)
class ClampBands:
    """Upper edges of the bands and the value each band maps to (None = keep x)."""

    edges: tuple[float, ...] = (0.06, 0.20, 0.70, 1.0)
    values: tuple[float | None, ...] = (0.001, 0.06, None, 0.99)
    zero_value: float = 0.001  # what x == 0 maps to (the paper's cases start at 0 < x)

    def __post_init__(self) -> None:
        if len(self.edges) != len(self.values):
            raise ValueError(f"ClampBands: expected one value per edge, found {len(self.edges)} edges and {len(self.values)} values")
        if list(self.edges) != sorted(self.edges) or self.edges[-1] != 1.0:
            raise ValueError(f"ClampBands: expected increasing edges ending at 1.0, found {self.edges}")


PAPER_BANDS = ClampBands()


def clamp_eq1(probs: np.ndarray, bands: ClampBands = PAPER_BANDS, renormalize: bool = False) -> np.ndarray:
    """Apply equation (1) element-wise to clip probabilities.

    Args:
        probs: [n, n_classes] probabilities in [0, 1].
        bands: band edges and values; the paper's by default.
        renormalize: rescale rows to sum to one afterwards (the paper does not).
    """
    x = as_probs(probs)
    out = x.copy()
    # Which band a value falls in is decided at float32 precision, the precision runs are stored in:
    # a stored 0.2 reads back as 0.200000003 and compared in float64 would land above the 0.20 edge
    # (kept at 0.2, not 0.06), while 0.06 and 0.7 read back below theirs. Values keep their float64.
    x32 = x.astype(np.float32)
    lower = np.float32(0.0)
    for edge, value in zip(bands.edges, bands.values):
        band = (x32 > lower) & (x32 <= np.float32(edge))
        if value is not None:
            out[band] = value
        lower = np.float32(edge)
    out[x32 == 0.0] = bands.zero_value
    if renormalize:
        out = out / out.sum(axis=1, keepdims=True)
    return out
