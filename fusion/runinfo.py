"""What a prediction run was made from: head, inputs by modality, and the weights of every encoder.

Reports must say plainly when an encoder ran with random weights. The information comes from two
places that should agree: the run's attributes written by ``heads`` (``weights_identity``,
``random_weights``) and the provenance of the feature sets in the store. A feature counts as random
when *either* says so.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from featurestore.provenance import is_random_weights, weights_identity

ARCH_KEYS = ("backbone", "model", "arch", "timm_model", "encoder")


@dataclass
class RunInfo:
    """A prediction run as the report's Table 2 shows it."""

    run: str
    head: str
    architecture: str
    audio_inputs: list[str] = field(default_factory=list)
    video_inputs: list[str] = field(default_factory=list)
    weights: dict[str, str] = field(default_factory=dict)   # feature -> weights identity
    random_features: list[str] = field(default_factory=list)
    train_split: str | None = None
    val_split: str | None = None

    @property
    def random(self) -> bool:
        return bool(self.random_features)


def feature_modality(name: str, provenance: dict | None) -> str:
    """``audio`` or ``video`` for a feature set, from its provenance, else from its encoder spec."""
    prov = provenance or {}
    declared = prov.get("modality") or (prov.get("config") or {}).get("modality")
    if declared in ("audio", "video"):
        return declared
    spec = str(prov.get("encoder") or name).lower()
    return "audio" if spec.startswith(("logmel", "audio")) or "/logmel" in spec else "video"


def _architecture(attrs: dict) -> tuple[str, str]:
    head = str(attrs.get("head", "?"))
    config = attrs.get("head_config") or {}
    for key in ARCH_KEYS:
        if config.get(key):
            return head, f"{head} ({config[key]})"
    return head, head


def describe_run(store, run: str) -> RunInfo:
    """Build the :class:`RunInfo` of one run from its attributes and the store's feature sets."""
    return describe_runs(store, [run])[run]


def describe_runs(store, runs: Iterable[str] | None = None,
                  feature_sets: dict[str, Any] | None = None) -> dict[str, RunInfo]:
    """The :class:`RunInfo` of each of ``runs`` (default: every run in the store, sorted).

    Reads the run attributes and the feature sets once for all runs: ``store.feature_sets()``
    reads every feature set's done mask. Pass ``feature_sets`` when the caller has them already.
    """
    attrs = store.prediction_runs()
    stored = store.feature_sets() if feature_sets is None else feature_sets
    names = sorted(attrs) if runs is None else list(runs)
    return {run: _describe(run, attrs[run], stored) for run in names}


def _describe(run: str, attrs: dict, stored: dict[str, Any]) -> RunInfo:
    head, arch = _architecture(attrs)
    info = RunInfo(run, head, arch, train_split=attrs.get("train_split"), val_split=attrs.get("val_split"))
    run_identities = attrs.get("weights_identity") or {}
    for feature in (attrs.get("features") or {}):
        known = stored.get(feature)
        provenance = known.provenance if known else None
        modality = feature_modality(feature, provenance)
        (info.audio_inputs if modality == "audio" else info.video_inputs).append(feature)
        identity = known.weights_identity if known else str(run_identities.get(feature, "unknown"))
        info.weights[feature] = identity
        if (known and known.random_weights) or str(run_identities.get(feature, "")).upper().startswith("RANDOM"):
            info.random_features.append(feature)
    _add_backbone(info, attrs)
    if attrs.get("random_weights") and not info.random_features:
        info.random_features = list(info.weights) or ["(unnamed inputs)"]
    return info


def _add_backbone(info: RunInfo, attrs: dict) -> None:
    """A head with its own pretrained backbone (spectrogram_cnn) has weights that are no feature set."""
    backbone = attrs.get("backbone_weights")
    if not backbone:
        return
    name = f"backbone:{(attrs.get('head_config') or {}).get('backbone', info.head)}"
    info.weights[name] = weights_identity({"weights": backbone})
    if is_random_weights({"weights": backbone}):
        info.random_features.append(name)
