"""Provenance records and the fingerprints derived from them.

A feature set's fingerprint is the SHA-256 of its provenance *minus* the ``runtime`` section, in
canonical JSON. The runtime section (library versions, host, time) documents a run but must not make
a rerun after ``pip install -U`` refuse to resume into the same feature set.
"""
from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

RUNTIME_KEY = "runtime"
PER_DATASET_SEGMENT_KEYS = ("n_segments", "n_frames")
_VERSIONED = ("avscene", "numpy", "torch", "torchvision", "timm", "open_clip_torch", "zarr", "h5py", "librosa", "av")


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the same dict always gives the same text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(provenance: dict) -> str:
    """SHA-256 (hex, first 16 chars) of the provenance without its runtime section.

    A checkpoint is identified by its content hash, not where it lies: moving the file must not
    make a resume refuse, so ``weights.path`` is left out whenever ``weights.sha256`` is there, and
    so is the path inside the encoder spec (``timm/x@/ckpt/w.pt`` counts as ``timm/x@file``).
    How many segments or frames a clip has is the dataset's, not the encoder's (10 x 1 s in the
    development set, 1 x 1 s in the evaluation set): it is left out too, so a head trained on one
    store accepts the same encoder's features in the other. The array shape guards it in a store.
    """
    return _fingerprint(provenance, spec_path=False)


def fingerprint_matches(stored: str | None, provenance: dict) -> bool:
    """Whether a fingerprint recorded with a feature set belongs to ``provenance``.

    Feature sets made from a checkpoint before the path inside the spec was left out carry the
    fingerprint of that older rule; they are still recognised (same file at the same path), so an
    upgrade neither makes ``verify`` report them nor refuses resuming into them.
    """
    return stored in (fingerprint(provenance), _fingerprint(provenance, spec_path=True))


def _fingerprint(provenance: dict, spec_path: bool) -> str:
    body = {k: v for k, v in provenance.items() if k != RUNTIME_KEY}
    segments = body.get("segments")
    if isinstance(segments, dict):
        body["segments"] = {k: v for k, v in segments.items() if k not in PER_DATASET_SEGMENT_KEYS}
    weights = body.get("weights")
    if isinstance(weights, dict) and weights.get("sha256"):
        body["weights"] = {k: v for k, v in weights.items() if k != "path"}
        if not spec_path:
            body["encoder"] = _spec_without_path(body.get("encoder"), weights.get("path"))
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()[:16]


def _spec_without_path(spec: Any, path: Any) -> Any:
    """``family/model@<checkpoint path>`` -> ``family/model@file``; any other spec as it is."""
    if not isinstance(spec, str) or "@" not in spec:
        return spec
    name, _, weights = spec.partition("@")
    return f"{name}@file" if not path or weights == str(path) else spec


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks so multi-GB checkpoints do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def runtime_info() -> dict:
    """Library versions, Python and host: recorded beside every feature set and prediction run."""
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "host": platform.node(),
        "versions": dict(_library_versions()),
    }


@functools.cache
def _library_versions() -> tuple[tuple[str, str], ...]:
    """The installed versions of ``_VERSIONED``, read once per process (~40 ms of package metadata
    per feature set created otherwise): the libraries imported are those of the process's start."""
    versions = []
    for name in _VERSIONED:
        try:
            versions.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            continue
    return tuple(versions)


def is_random_weights(provenance: dict) -> bool:
    """True when the encoder behind a feature set ran with randomly initialised weights."""
    weights = provenance.get("weights") or {}
    return weights.get("kind") == "random"


def weights_identity(provenance: dict) -> str:
    """A short human-readable identity of the weights: ``openai``, ``openai:ab12cd..`` (a tag whose
    file's sha256 was recorded: two files under one tag read apart), ``file:ab12cd..``, ``RANDOM(seed=0)``."""
    weights = provenance.get("weights") or {}
    kind = weights.get("kind")
    if kind == "random":
        return f"RANDOM(seed={weights.get('seed')})"
    if kind == "file":
        return f"file:{str(weights.get('sha256', ''))[:12]}"
    if kind == "pretrained":
        digest = str(weights.get("sha256") or "")[:12]
        return f"{weights.get('tag')}:{digest}" if digest else str(weights.get("tag"))
    if kind is None:
        return "n/a"
    return str(kind)
