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
    return clip_metrics(np.concatenate(rows), np.concatenate(labels), np.concatenate(sums),
                        np.concatenate(counts), seg_hits / max(1, seg_total))


def clip_metrics(rows: np.ndarray, labels: np.ndarray, prob_sums: np.ndarray, counts: np.ndarray,
                 segment_accuracy: float) -> dict[str, float]:
    """Group per-sample probability sums by clip row, average, and score."""
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
