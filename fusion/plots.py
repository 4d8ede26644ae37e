"""Report figures: confusion matrix and reliability diagram (matplotlib, Agg backend, PNG).

Figures are rendered to PNG bytes in memory, so a caller can write them whole or not at all:
:func:`fusion.report.write_report` publishes its figures together with the rest of the report.
"""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np

from fusion.metrics import ReliabilityBins


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines; set before pyplot is imported
    import matplotlib.pyplot as plt

    return plt


def _png(plt, fig) -> bytes:
    try:
        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=100, format="png")
        return buffer.getvalue()
    finally:
        plt.close(fig)


def _plain(text: object) -> str:
    """``text`` shown as written. Matplotlib reads a pair of ``$`` as TeX math: a class or recipe
    name like ``park $\\frac$`` would fail the whole figure (``ParseSyntaxException``) and ``a $b$``
    would be drawn as ``a b`` in italics. An escaped ``\\$`` is a literal dollar sign."""
    return str(text).replace("$", r"\$")


def confusion_png(matrix: np.ndarray, classes: Sequence[str], title: str = "") -> bytes:
    """Row-normalised confusion matrix (true class rows) with the counts written in each cell, as PNG."""
    plt = _pyplot()
    counts = np.asarray(matrix)
    totals = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=float), where=totals > 0)
    fig, ax = plt.subplots(figsize=(8, 7))
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    labels = [_plain(c) for c in classes]
    ax.set_xticks(range(len(classes)), labels, rotation=60, ha="right")
    ax.set_yticks(range(len(classes)), labels)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            if counts[i, j]:
                ax.text(j, i, str(counts[i, j]), ha="center", va="center",
                        color="white" if rates[i, j] > 0.5 else "black", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    ax.set_title(_plain(title) if title else "Confusion matrix")
    fig.tight_layout()
    return _png(plt, fig)


def reliability_png(curves: Mapping[str, ReliabilityBins], title: str = "") -> bytes:
    """Accuracy against confidence per bin for each named variant, with the diagonal and ECE, as PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    for name, bins in curves.items():
        used = bins.count > 0
        ax.plot(bins.confidence[used], bins.accuracy[used], marker="o", label=_plain(f"{name} (ECE {bins.ece:.3f})"))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("top-class confidence")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(_plain(title) if title else "Reliability diagram")
    fig.tight_layout()
    return _png(plt, fig)
