"""The ``Encoder`` base class, device resolution and the shared preprocessors.

The spec grammar (``EncoderSpec``, ``parse_spec``, ``SpecError``) lives in ``featurestore._spec``,
which imports no torch, and is re-exported here and from ``featurestore.encoders``.

An encoder turns decoded input (1 s audio segments or RGB video frames) into the arrays the store
keeps. It is split in two on purpose: ``preprocessor()`` returns a small picklable callable that runs
in DataLoader worker processes and holds no model, and ``encode()`` runs the model batched on the
device. That is what lets decoding, preprocessing and encoding overlap during extraction.
"""
from __future__ import annotations

import abc
import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from featurestore._devices import DEVICE_HELP  # noqa: F401 - re-exported by featurestore.encoders
from featurestore._spec import FAMILY_RE, EncoderSpec, SpecError, parse_spec  # noqa: F401 - re-exported
from featurestore.errors import FeatureStoreError

MODALITIES = ("audio", "video", "text")
_FAMILY_RE = FAMILY_RE


class UnknownEncoderError(FeatureStoreError, KeyError):
    """An encoder family or model is not known; the message lists the nearest known names."""

    def __init__(self, what: str, name: str, known: Iterable[str], hint: str = ""):
        self.name = name
        known = sorted(set(known))
        near = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        listing = ", ".join(known) if len(known) <= 30 else f"{len(known)} names"
        message = f"unknown {what} {name!r}; known: {listing or '(none)'}."
        if near:
            message += f" Did you mean {', '.join(near)}?"
        if hint:
            message += f" {hint}"
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.args[0]


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


class Encoder(abc.ABC):
    """Base class of every encoder: a spec, a preprocessor and a batched ``encode``.

    Subclasses set ``modality`` and implement ``output_shape``, ``config``, ``preprocessor`` and
    ``forward``; models live in ``self.module`` so that ``to()`` moves them. ``encode`` wraps
    ``forward`` with the device move, inference mode and an output-shape check, so a plugin that
    returns the wrong shape fails at its first batch and not in a downstream head.
    """

    modality: ClassVar[str] = ""
    dtype: ClassVar[str] = "float16"
    # A cheap spec of this family (random weights, small model) that the test suite builds and runs
    # for every registered family, so a new encoder gets a contract test without anyone adding one.
    smoke_spec: ClassVar[str | None] = None

    def __init__(self, spec: str | EncoderSpec) -> None:
        self._spec = parse_spec(spec)
        self._feature_set: str | None = None  # a user-chosen feature-set name (NAME=SPEC)
        #: How ``create_encoder`` was asked for this encoder: ``{"spec": ..., "options": {...}}`` (None
        #: when built directly). Extraction records it beside the provenance and rebuilds Dask
        #: workers' encoders from it; a rerun that asks the same can skip building at all.
        self.request: dict[str, Any] | None = None
        self.device = torch.device("cpu")
        self.module: torch.nn.Module | None = None
        self.sample_rate: int | None = None
        self.segment_seconds: float | None = None

    # ----------------------------------------------------------------- what the registry asks
    @classmethod
    def known_models(cls) -> list[str] | None:
        """Model names this family accepts, or None when it takes no model or cannot list them."""
        return None

    @classmethod
    def check_spec(cls, spec: EncoderSpec) -> None:
        """Reject a spec whose model is not one of ``known_models()`` before building anything."""
        known = cls.known_models()
        if known is None:
            return
        if spec.model is None:
            raise SpecError(f"encoder spec {str(spec)!r} needs a model: '{spec.family}/<model>', e.g. "
                            f"{', '.join(f'{spec.family}/{m}' for m in known[:3])}")
        if spec.model not in known:
            raise UnknownEncoderError(f"{spec.family} model", spec.model, known,
                                      hint=f"See list_encoders('{spec.family}/*', models=True).")

    # ----------------------------------------------------------------- identity
    @property
    def spec(self) -> str:
        """The canonical spec, weights included (``clip/ViT-B-32@openai``)."""
        return str(self._spec)

    @property
    def name(self) -> str:
        """The feature-set name in the store: the one chosen with ``NAME=SPEC``, else the spec
        without its weights (``clip/ViT-B-32``, ``logmel``)."""
        return getattr(self, "_feature_set", None) or self._spec.name

    @name.setter
    def name(self, name: str | None) -> None:
        """Choose the feature-set name (None: back to the default); checked like every store name."""
        from featurestore._spec import check_feature_set_name

        self._feature_set = None if name is None else check_feature_set_name(name)

    @property
    @abc.abstractmethod
    def output_shape(self) -> tuple[int, ...]:
        """Shape of one segment's / frame's output, e.g. ``(512,)`` or ``(256, 94)``."""

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """Every parameter that changes the outputs (JSON-able); it goes into the fingerprint."""

    def weights_provenance(self) -> dict[str, Any]:
        """Identity of the weights; parameter-free encoders (log-mel) keep this default."""
        return {"kind": "parameter-free"}

    def provenance(self) -> dict[str, Any]:
        """``{"encoder", "config", "weights"}`` as recorded with a feature set (see provenance.py)."""
        config = {
            "modality": self.modality,
            "output_shape": list(self.output_shape),
            "dtype": self.dtype,
            **self.config(),
        }
        return {"encoder": self.spec, "config": config, "weights": self.weights_provenance()}

    # ----------------------------------------------------------------- running
    @abc.abstractmethod
    def preprocessor(self) -> Any:
        """A picklable callable holding no model, run in DataLoader workers."""

    @abc.abstractmethod
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Model forward on a batch already on ``self.device``; returns ``[B, *output_shape]``."""

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """Encode a preprocessed batch: ``[B, ...]`` on any device -> ``[B, *output_shape]`` float32.

        Runs without gradients in eval mode on ``self.device`` (a plugin need not call ``eval()``
        itself: dropout or batch-norm statistics must never change stored features). The result
        stays float32 on the device; extraction casts it to ``self.dtype`` before writing.
        """
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"{self.spec}: encode() expects a torch.Tensor batch, got {type(batch).__name__}")
        if self.module is not None and self.module.training:
            self.module.eval()
        with torch.inference_mode():
            out = self.forward(batch.to(self.device, non_blocking=True))
        expected = (batch.shape[0], *self.output_shape)
        if tuple(out.shape) != expected:
            raise RuntimeError(f"{self.spec}: encoder returned shape {tuple(out.shape)}, expected {expected}")
        return out

    def to(self, device: str | torch.device) -> Encoder:
        """Move the model to ``device`` (``"auto"`` allowed); returns self for chaining."""
        self.device = resolve_device(device)
        if self.module is not None:
            self.module.to(self.device)
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, modality={self.modality!r}, " \
               f"output_shape={self.output_shape}, device={str(self.device)!r})"


# ===================================================================== shared preprocessors
@dataclass(frozen=True)
class AudioSegments:
    """Checks and converts ``float [n_seg, samples]`` numpy audio to a float32 tensor.

    The check matters: a segment of the wrong length would otherwise become a log-mel with a
    different number of frames and fail much later when the store writes it.
    """

    samples: int
    sample_rate: int

    def __call__(self, segments: np.ndarray) -> torch.Tensor:
        array = np.asarray(segments)
        if array.ndim != 2 or array.shape[1] != self.samples or not np.issubdtype(array.dtype, np.floating):
            raise ValueError(
                f"expected float audio segments [n_seg, {self.samples}] ({self.samples / self.sample_rate:g} s "
                f"at {self.sample_rate} Hz), got {array.dtype} array of shape {array.shape}")
        return torch.from_numpy(np.array(array, dtype=np.float32, copy=True))


_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class FramePreprocessor:
    """Resize, center-crop and normalise ``uint8 [K, H, W, 3]`` RGB frames to ``float32 [K, 3, h, w]``.

    It reproduces the eval transforms of timm and open_clip (PIL resize -> center crop -> to tensor ->
    normalise) with torch ops on whole frame stacks, so it needs no PIL and pickles as plain data.
    Resizing uses antialiased interpolation, which is the kernel PIL uses, and rounds to the uint8
    grid as PIL does; tests compare it with the libraries' own transforms.

    Attributes:
        crop: output ``(h, w)``.
        resize: an int resizes the shorter side to it (aspect kept, torchvision's rounding); an
            ``(h, w)`` pair resizes to exactly that ("squash").
        interpolation: ``bilinear``, ``bicubic`` or ``nearest``.
        mean: per-channel mean on the [0, 1] scale.
        std: per-channel std on the [0, 1] scale.
    """

    crop: tuple[int, int]
    resize: int | tuple[int, int]
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {_INTERPOLATIONS}")

    def config(self) -> dict[str, Any]:
        """The parameters as JSON-able data, for provenance."""
        resize = self.resize if isinstance(self.resize, int) else list(self.resize)
        return {"crop": list(self.crop), "resize": resize, "interpolation": self.interpolation,
                "mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """Size after the resize step, with torchvision's rounding for shorter-side resizes."""
        if not isinstance(self.resize, int):
            return int(self.resize[0]), int(self.resize[1])
        if width <= height:
            return int(self.resize * height / width), self.resize
        return self.resize, int(self.resize * width / height)

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        if not (isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4
                and frames.shape[-1] == 3):
            found = f"{frames.dtype} array of shape {frames.shape}" if isinstance(frames, np.ndarray) \
                else type(frames).__name__
            raise ValueError(f"expected uint8 RGB frames [K, H, W, 3], got {found}")
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        out = torch.empty((frames.shape[0], 3, *self.crop), dtype=torch.float32)
        for i, frame in enumerate(frames):  # one frame at a time: a 12 x 1080p float stack is 300 MB
            x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).unsqueeze(0).float()
            x = _center_crop(self._resize(x), self.crop)
            out[i] = ((x / 255.0 - mean) / std)[0]
        return out

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        size = self.resized_size(x.shape[-2], x.shape[-1])
        if size == tuple(x.shape[-2:]):
            return x
        if self.interpolation == "nearest":
            return F.interpolate(x, size=size, mode="nearest")
        x = F.interpolate(x, size=size, mode=self.interpolation, align_corners=False, antialias=True)
        return x.clamp_(0.0, 255.0).round_()


def _center_crop(x: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    """Center crop with torchvision's offsets (``round((H - h) / 2)``)."""
    height, width = x.shape[-2:]
    if height < crop[0] or width < crop[1]:
        raise ValueError(f"cannot crop {tuple(crop)} from a {height}x{width} resized frame")
    top = int(round((height - crop[0]) / 2.0))
    left = int(round((width - crop[1]) / 2.0))
    return x[..., top:top + crop[0], left:left + crop[1]]
