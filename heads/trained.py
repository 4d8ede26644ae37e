"""A trained run loaded for use on arrays: ``TrainedHead.load(run_dir).predict_proba(features)``.

``heads predict`` runs a head over a store; this runs it over feature arrays a caller already has
(the features of new recordings, made by ``featurestore.encode_files.FileEncoder``), with the same
forward pass: segments flattened into one batch, softmax in float32, reshaped back per clip.

`load_head` is the one way a run's head is rebuilt (``heads predict`` and ``heads classify`` both
use it). Every size in ``run.json`` is taken on trust by the head's constructor, so the head is
first built on torch's ``meta`` device (shapes only, nothing allocated) and its tensor shapes are
compared with the weights file's header; only a head that fits the weights on disk is built for real.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featurestore.checks import is_int_in
from featurestore.encoders import resolve_device
from heads._registry import Head, create_head, head_class
from heads.zero_shot import check_towers
from heads.checkpoint import CheckpointError, check_sha256, check_shapes, load_weights, read_json_object, run_file


def weights_path(run_dir: Path, weights: str) -> Path:
    """The safetensors file ``weights`` (``"best"`` or ``"last"``) names in a run directory."""
    if weights == "best":
        return run_dir / "best.safetensors"
    if weights == "last":
        return run_file(run_dir, read_json_object(run_dir / "state.json", {"checkpoint": str})["checkpoint"])
    raise ValueError(f"weights must be 'best' or 'last', got {weights!r}")


def check_weights_file(run_dir: Path, weights: str, path: Path) -> None:
    """Refuse a weights file whose bytes are not the ones training recorded (``best_sha256`` or
    ``checkpoint_sha256`` in ``state.json``; see `heads.checkpoint.check_sha256`)."""
    state_path = run_dir / "state.json"
    if state_path.is_file():
        state = read_json_object(state_path, {})
        check_sha256(path, state.get("best_sha256" if weights == "best" else "checkpoint_sha256"))


def load_head(run_dir: str | Path, device: str | torch.device = "cpu", weights: str = "best") -> tuple[Head, dict]:
    """A trained head (eval mode) and its ``run.json``.

    Args:
        run_dir: a directory written by `heads.train`.
        device: where to put the head (``"auto"``, ``"cpu"``, ``"cuda[:N]"`` or a torch.device).
        weights: ``"best"`` (best epoch by validation accuracy) or ``"last"`` (last completed epoch).

    Raises:
        FileNotFoundError: not a run directory, or its weights file is missing.
        CheckpointError: ``run.json`` does not describe a head, or the weights file does not fit it
            (checked from the safetensors header before the head is allocated).
        ConfigError: a zero-shot run whose class prompts another CLIP model or other weights made
            (`heads.zero_shot.check_towers`; runs trained before the check are caught here).
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} does not exist")
    if not (run_dir / "run.json").exists():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a training run directory (no run.json)")
    info = run_info(run_dir)
    check_towers(info, str(run_dir))  # zero-shot prompts of another CLIP model: refused before any answer
    path = weights_path(run_dir, weights)
    name, config = _head_spec(run_dir, info)
    check_weights_file(run_dir, weights, path)
    check_shapes(path, _shapes_on_meta(run_dir, name, config), f"the {name} head run.json describes")
    head = create_head(name, **config)
    state, _ = load_weights(path)
    head.load_state_dict(state)
    return head.to(resolve_device(device)).eval(), info


def run_info(run_dir: Path) -> dict:
    """A run's ``run.json``, checked to hold what loading and predicting read, of the right kinds.

    The trainer writes it; a file truncated, overwritten or edited by hand is refused here in one
    line naming the file and the key, instead of failing later with a bare ``KeyError``/``TypeError``
    (or a string of feature names read letter by letter).

    Raises:
        CheckpointError: not JSON, or a key missing or of the wrong kind.
    """
    path = run_dir / "run.json"
    info = read_json_object(path, {"head": str, "head_config": dict, "train": dict, "features": dict})
    names = info["train"].get("features")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{path}: 'train.features' should be a non-empty list of feature set names, found {names!r:.80}")
    unknown = [n for n in names if not isinstance(info["features"].get(n), str)]
    if unknown or not all(isinstance(v, str) for v in info["features"].values()):
        raise CheckpointError(f"{path}: 'features' should map every input feature set to its fingerprint; "
                              f"{unknown or 'some'} have none")
    classes = info.get("classes")
    if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)):
        raise CheckpointError(f"{path}: 'classes' should be a list of class names, found {classes!r:.80}")
    for key, kind in (("feature_info", dict), ("feature_provenance", dict), ("class_features", str)):
        value = info.get(key) or {}
        if not isinstance(value, dict) or not all(isinstance(v, kind) for v in value.values()):
            raise CheckpointError(f"{path}: {key!r} should map feature set names to "
                                  f"{'objects' if kind is dict else 'fingerprints'}, found {value!r:.80}")
    for name, meta in (info.get("feature_info") or {}).items():
        shape = meta.get("shape")
        if shape is not None and (not isinstance(shape, list) or not all(type(n) is int and n > 0 for n in shape)):
            raise CheckpointError(f"{path}: 'feature_info.{name}.shape' should be a list of sizes, found {shape!r:.80}")
    return info


def _head_spec(run_dir: Path, info: dict) -> tuple[str, dict]:
    """The head name and loading config ``run.json`` records (checked by `run_info`)."""
    name = info["head"]
    return name, head_class(name).loading_config(info["head_config"])


def _shapes_on_meta(run_dir: Path, name: str, config: dict) -> dict[str, tuple[int, ...]]:
    """The shapes of the head's state dict, from a head built on the meta device (no memory used)."""
    try:
        with torch.device("meta"):
            head = create_head(name, **config)
    except Exception as err:  # noqa: BLE001 - any constructor error means run.json's config is not buildable
        raise CheckpointError(f"{run_dir / 'run.json'}: head_config does not build a {name} head "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    return {key: tuple(t.shape) for key, t in head.state_dict().items()}


@dataclass
class TrainedHead:
    """A head from a run directory, in eval mode on ``device``, with what its run recorded.

    Attributes:
        head: the module.
        info: the run's ``run.json``.
        run_dir: where it was loaded from.
        weights: ``"best"`` or ``"last"``.
        device: where it runs.
    """

    head: Head
    info: dict
    run_dir: Path
    weights: str
    device: torch.device

    @classmethod
    def load(cls, run_dir: str | Path, device: str | torch.device = "auto", weights: str = "best") -> TrainedHead:
        """Load the run's ``best`` (or ``last``) weights; ``device="auto"`` picks CUDA when available."""
        dev = resolve_device(device)
        head, info = load_head(run_dir, dev, weights)
        return cls(head, info, Path(run_dir), weights, dev)

    @property
    def features(self) -> list[str]:
        """The input feature sets, in the head's input order."""
        return list(self.info["train"]["features"])

    @property
    def classes(self) -> list[str] | None:
        """Class names in the order of the head's outputs (None for runs that predate recording them)."""
        classes = self.info.get("classes")
        return list(classes) if classes is not None else None

    def feature_shape(self, name: str) -> tuple[int, ...] | None:
        """Per-segment shape of input ``name`` as trained (None when the run did not record it)."""
        shape = (self.info.get("feature_info", {}).get(name) or {}).get("shape")
        return tuple(int(s) for s in shape[1:]) if shape else None  # recorded as [n_segments, *shape]

    def batch_clips(self, n_segments: int) -> int:
        """Clips per forward pass: about four training batches of segments, as ``heads predict`` uses."""
        return max(1, 4 * self.head.default_batch_size // max(1, n_segments))

    @torch.no_grad()
    def predict_proba(self, features: Mapping[str, np.ndarray], batch_size: int | None = None) -> np.ndarray:
        """Per-segment class probabilities of feature arrays.

        Args:
            features: feature set name -> ``[n_clips, n_segments, *shape]`` (as ``store.get_many``
                returns) or one clip's ``[n_segments, *shape]``; any stored dtype. Every input of the
                head must be there (extra names are ignored), all with the same clip and segment counts.
            batch_size: clips per forward pass (default: :meth:`batch_clips`).

        Returns:
            float32 ``[n_clips, n_segments, n_classes]`` (``[n_segments, n_classes]`` for one clip's
            arrays), classes in :attr:`classes` order; softmax per segment, as ``heads predict`` writes
            them. The clip-level probabilities are their mean over segments.

        Raises:
            ValueError: an input is missing or its shape is not the one the head was trained on, or
                ``batch_size`` is not an integer >= 1 (a negative one returned no rows at all).
        """
        if batch_size is not None and not is_int_in(batch_size, 1):
            raise ValueError(f"batch_size must be an integer >= 1 (clips per forward pass) or None, got {batch_size!r}")
        arrays, single = self._inputs(features)
        n_clips, n_segments = arrays[0].shape[:2]
        step = batch_size if batch_size is not None else self.batch_clips(n_segments)
        self.head.eval()
        parts = []
        for lo in range(0, n_clips, step):
            flat = [torch.from_numpy(np.ascontiguousarray(a[lo:lo + step])).float().to(self.device).flatten(0, 1)
                    for a in arrays]
            probs = torch.softmax(self.head(flat).float(), dim=-1)
            parts.append(probs.reshape(-1, n_segments, probs.shape[-1]).cpu().numpy())
        out = np.concatenate(parts) if parts else np.zeros((0, n_segments, self._n_classes()), np.float32)
        return out[0] if single else out

    def _n_classes(self) -> int:
        return int(self.info["head_config"].get("n_classes") or len(self.classes or []))

    def _inputs(self, features: Mapping[str, Any]) -> tuple[list[np.ndarray], bool]:
        """The head's inputs in order, batched, checked against the trained shapes."""
        missing = [name for name in self.features if name not in features]
        if missing:
            raise ValueError(f"run {str(self.run_dir)!r} takes feature sets {self.features}; missing {missing}")
        arrays, single = [], None
        for name in self.features:
            array = np.asarray(features[name])
            shape = self.feature_shape(name)
            one = shape is not None and array.ndim == len(shape) + 1
            if shape is not None and (array.ndim not in (len(shape) + 1, len(shape) + 2)
                                      or tuple(array.shape[-len(shape):]) != shape):
                raise ValueError(f"feature set {name!r}: expected [n_clips, n_segments, {', '.join(map(str, shape))}] "
                                 f"or [n_segments, {', '.join(map(str, shape))}], got shape {list(array.shape)}")
            if shape is None and array.ndim < 3:
                raise ValueError(f"feature set {name!r}: expected [n_clips, n_segments, ...], got shape {list(array.shape)}")
            single = one if single is None else single
            if one != single:
                raise ValueError(f"feature set {name!r}: one clip's array among batched ones (shape {list(array.shape)})")
            arrays.append(array[None] if one else array)
        counts = {a.shape[:2] for a in arrays}
        if len(counts) != 1:
            raise ValueError(f"feature sets {self.features} have different [n_clips, n_segments]: "
                             f"{[list(a.shape[:2]) for a in arrays]}; a head predicts one row per segment")
        return arrays, bool(single)
