"""The ``Encoder`` base class every encoder (built-in or plugin) derives from.

An encoder turns decoded input (1 s audio segments or RGB video frames) into the arrays the store
keeps. It is split in two on purpose: ``preprocessor()`` returns a small picklable callable that runs
in DataLoader worker processes and holds no model, and ``encode()`` runs the model batched on the
device. That is what lets decoding, preprocessing and encoding overlap during extraction.
"""
from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch

from featurestore.encoders._device import resolve_device
from featurestore.encoders._names import EncoderSpec, SpecError, UnknownEncoderError, parse_spec


#: ``Encoder.set_run_options(precision=)`` values.
PRECISIONS = ("float32", "bfloat16")
#: Options every encoder takes (``create_encoder(spec, precision="bfloat16")``, ``--encoder-option
#: clip/ViT-B-32.precision=bfloat16``), handled by the base class rather than each family.
RUN_OPTIONS = ("precision", "channels_last")


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
    #: A parameter-free encoder whose ``encode`` is cheaper than two copies of its input (``frames``:
    #: a dtype change): extraction runs it on the host even when the others run on an accelerator.
    runs_on_host: ClassVar[bool] = False

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
        #: How ``encode`` runs (``set_run_options``): float32 or bfloat16 autocast, channels-last input.
        self.precision = "float32"
        self.channels_last = False

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
        run = self.run_options()
        if run:  # only when not the defaults, so the fingerprints of float32 feature sets stay as they were
            config["run"] = run
        return {"encoder": self.spec, "config": config, "weights": self.weights_provenance()}

    # ----------------------------------------------------------------- running
    def set_run_options(self, precision: str = "float32", channels_last: bool = False) -> Encoder:
        """Choose how ``encode`` runs; both change the outputs' bits, so both are in the fingerprint.

        Args:
            precision: ``"float32"``, or ``"bfloat16"``: ``forward`` under bf16 autocast (a GPU's
                fast path; features differ from float32 ones by bf16 rounding, never stored
                under the same fingerprint).
            channels_last: feed 4-d image batches in channels-last memory layout (faster
                convolutions on GPUs, same values up to the kernels' summation order).
        """
        if precision not in PRECISIONS:
            raise SpecError(f"{self.spec}: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if not isinstance(channels_last, bool):
            raise SpecError(f"{self.spec}: channels_last must be true or false, got {channels_last!r}")
        self.precision, self.channels_last = precision, channels_last
        if self.module is not None and channels_last:
            self.module.to(memory_format=torch.channels_last)
        return self

    def run_options(self) -> dict[str, Any]:
        """The run options that differ from the defaults (recorded in the provenance config)."""
        out: dict[str, Any] = {}
        if self.precision != "float32":
            out["precision"] = self.precision
        if self.channels_last:
            out["channels_last"] = True
        return out

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
        x = batch.to(self.device, non_blocking=True)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        bf16 = self.precision == "bfloat16"
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = self.forward(x)
        if out.dtype != torch.float32:
            out = out.float()
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
