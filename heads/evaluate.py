"""Running a head over a loader: segment probabilities, per-clip averages and validation metrics.

Validation is at clip level, the way the paper reports it: the softmax probabilities of a clip's
segments (1 s audio segments or video frames) are averaged, then accuracy and log-loss are computed
per clip. Segment-level accuracy is reported beside it.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from heads._registry import Head

EPS = 1e-15


class NonFiniteOutputError(ValueError):
    """The head gave NaN or infinite probabilities for some clips (finite inputs, weights that overflow)."""


@dataclass
class ClipOutputs:
    """Probabilities of a batch of clips: ``probs [B, n_segments, n_classes]`` for store ``rows``."""

    rows: np.ndarray
    labels: np.ndarray
    probs: np.ndarray


@torch.no_grad()
def clip_outputs(head: Head, loader: Iterable, device: torch.device) -> Iterator[ClipOutputs]:
    """Softmax probabilities per clip and segment, from a clip-level loader (inputs ``[B, S, ...]``)."""
    head.eval()
    for batch in loader:
        b, s = batch.inputs[0].shape[:2]
        flat = [x.to(device).flatten(0, 1) for x in batch.inputs]
        probs = torch.softmax(head(flat).float(), dim=-1).reshape(b, s, -1)
        yield ClipOutputs(batch.rows.numpy(), batch.labels.numpy(), probs.cpu().numpy())


@torch.no_grad()
def segment_outputs(head: Head, loader: Iterable, device: torch.device) -> Iterator[ClipOutputs]:
    """Softmax probabilities from a segment-level loader, one row per sample (``probs [B, 1, C]``)."""
    head.eval()
    for batch in loader:
        probs = torch.softmax(head([x.to(device) for x in batch.inputs]).float(), dim=-1)
        yield ClipOutputs(batch.rows.numpy(), batch.labels.numpy(), probs.cpu().numpy()[:, None])


def evaluate(head: Head, loader: Iterable, device: torch.device) -> dict[str, float]:
    """Clip-level accuracy and log-loss (segment probabilities averaged per clip), plus segment accuracy.

    The loader may be clip level (``loader.level == "clip"``) or segment level; segment-level samples
    are grouped by their store row, so either gives the same clip metrics.

    Raises:
        NonFiniteOutputError: probabilities hold NaN or infinity (argmax of NaN is class 0: the
            accuracy of such a head was the share of class-0 clips, and it could be chosen as best).
    """
    clip_level = getattr(loader, "level", "segment") == "clip"
    outputs = clip_outputs if clip_level else segment_outputs
    rows, labels, sums, counts, seg_hits, seg_total = [], [], [], [], 0, 0
    for out in outputs(head, loader, device):
        seg_hits += int((out.probs.argmax(-1) == out.labels[:, None]).sum())
        seg_total += out.probs.shape[0] * out.probs.shape[1]
        rows.append(out.rows)
        labels.append(out.labels)
        sums.append(out.probs.sum(1))
        counts.append(np.full(len(out.rows), out.probs.shape[1]))
    if not rows:
        raise ValueError("the validation loader produced no samples (empty split?)")
    all_rows, all_sums = np.concatenate(rows), np.concatenate(sums)
    check_finite(all_rows, all_sums)
    return clip_metrics(all_rows, np.concatenate(labels), all_sums, np.concatenate(counts),
                        seg_hits / max(1, seg_total))


def clip_metrics(rows: np.ndarray, labels: np.ndarray, prob_sums: np.ndarray, counts: np.ndarray,
                 segment_accuracy: float) -> dict[str, float]:
    """Group per-sample probability sums by clip row, average, and score.

    Raises:
        ValueError: a label is not a class index (an unlabelled clip's -1 was scored against the last
            class, silently).
    """
    _check_labels(rows, labels, prob_sums.shape[1])
    uniq, inverse = np.unique(rows, return_inverse=True)
    total = np.zeros((len(uniq), prob_sums.shape[1]))
    n = np.zeros(len(uniq))
    np.add.at(total, inverse, prob_sums)
    np.add.at(n, inverse, counts)
    clip_labels = np.zeros(len(uniq), dtype=np.int64)
    clip_labels[inverse] = labels
    probs = total / n[:, None]
    picked = probs[np.arange(len(uniq)), clip_labels]
    return {
        "val_accuracy": float((probs.argmax(1) == clip_labels).mean()),
        "val_logloss": float(-np.log(np.clip(picked, EPS, 1.0)).mean()),
        "val_segment_accuracy": float(segment_accuracy),
        "val_clips": int(len(uniq)),
    }


def _check_labels(rows: np.ndarray, labels: np.ndarray, n_classes: int) -> None:
    """Refuse labels that are not class indices, naming the rows."""
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if len(bad):
        raise ValueError(f"{len(bad)} validation sample(s) (store rows {sorted(set(rows[bad].tolist()))[:5]}) have "
                         f"label(s) {sorted(set(labels[bad].tolist()))[:5]}, not a class index in [0, {n_classes}): "
                         f"unlabelled clips cannot be scored; leave them out of the split")


def check_finite(rows: np.ndarray, prob_sums: np.ndarray) -> None:
    """Refuse probabilities that are not finite, naming the rows (`NonFiniteOutputError`)."""
    bad = np.flatnonzero(~np.isfinite(prob_sums).all(axis=1))
    if len(bad):
        raise NonFiniteOutputError(f"the head gave NaN or infinite probabilities for {len(bad)} validation sample(s) "
                                   f"(store rows {sorted(set(rows[bad].tolist()))[:5]}) on finite inputs")
