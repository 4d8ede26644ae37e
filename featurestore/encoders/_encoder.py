"""The ``Encoder`` base class every encoder (built-in or plugin) derives from.

An encoder turns decoded input (1 s audio segments or RGB video frames) into the arrays the store
keeps. It is split in two on purpose: ``preprocessor()`` returns a small picklable callable that runs
in DataLoader worker processes and holds no model, and ``encode()`` runs the model batched on the
device. That is what lets decoding, preprocessing and encoding overlap during extraction.
"""
from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import torch

from featurestore.encoders._device import resolve_device
from featurestore.encoders._names import EncoderSpec, SpecError, UnknownEncoderError, parse_spec


#: ``Encoder.set_run_options(precision=)`` values.
PRECISIONS = ("float32", "bfloat16")
#: Options every encoder takes (``create_encoder(spec, precision="bfloat16")``, ``--encoder-option
#: clip/ViT-B-32.precision=bfloat16``), handled by the base class rather than each family.
RUN_OPTIONS = ("precision", "channels_last", "cudnn_benchmark", "compile")
#: The ``torch.compile`` backend that ``compile=True`` means.
DEFAULT_COMPILE_BACKEND = "inductor"


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
        #: cuDNN autotuning around ``forward`` (``torch.backends.cudnn.benchmark``), and the
        #: ``torch.compile`` backend of ``forward`` (None: eager).
        self.cudnn_benchmark = False
        self.compile_backend: str | None = None
        self._compiled: Any = None  # the compiled forward, built on first use (not pickled)
        #: The one batch size the compiled forward sees: the largest batch so far (see ``encode``).
        self.static_batch: int | None = None

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
    def set_run_options(self, precision: str = "float32", channels_last: bool = False,
                        cudnn_benchmark: bool = False, compile: bool | str = False) -> Encoder:
        """Choose how ``encode`` runs; each is recorded in the fingerprint when not the default.

        Args:
            precision: ``"float32"``, or ``"bfloat16"``: ``forward`` under bf16 autocast (a GPU's
                fast path; features differ from float32 ones by bf16 rounding, never stored
                under the same fingerprint).
            channels_last: feed 4-d image batches in channels-last memory layout (faster
                convolutions on GPUs, same values up to the kernels' summation order).
            cudnn_benchmark: let cuDNN time its convolution algorithms for each input shape and
                keep the fastest (``torch.backends.cudnn.benchmark``, set around ``forward`` only);
                the chosen algorithm can sum in another order, so values may move within float
                tolerance.
            compile: ``torch.compile`` the forward: ``True`` (backend ``inductor``) or a backend
                name. Batches are padded to one static size so the graph compiles once; fused
                kernels may round differently, within float tolerance.
        """
        if precision not in PRECISIONS:
            raise SpecError(f"{self.spec}: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        for key, value in (("channels_last", channels_last), ("cudnn_benchmark", cudnn_benchmark)):
            if not isinstance(value, bool):
                raise SpecError(f"{self.spec}: {key} must be true or false, got {value!r}")
        self.precision, self.channels_last, self.cudnn_benchmark = precision, channels_last, cudnn_benchmark
        self.compile_backend = self._compile_backend(compile)
        self._compiled, self.static_batch = None, None
        if self.module is not None and channels_last:
            self.module.to(memory_format=torch.channels_last)
        return self

    def _compile_backend(self, compile: bool | str) -> str | None:
        """``compile`` -> the backend name (None: eager), refusing what torch.compile does not know."""
        if compile is False:
            return None
        if compile is True:
            return DEFAULT_COMPILE_BACKEND
        import torch._dynamo

        known = sorted(torch._dynamo.list_backends(exclude_tags=()))
        if not isinstance(compile, str) or compile not in known:
            raise SpecError(f"{self.spec}: compile must be true, false or a torch.compile backend "
                            f"({', '.join(known)}), got {compile!r}")
        return compile

    def run_options(self) -> dict[str, Any]:
        """The run options that differ from the defaults (recorded in the provenance config)."""
        out: dict[str, Any] = {}
        if self.precision != "float32":
            out["precision"] = self.precision
        if self.channels_last:
            out["channels_last"] = True
        if self.cudnn_benchmark:
            out["cudnn_benchmark"] = True
        if self.compile_backend is not None:
            out["compile"] = self.compile_backend
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
        if self.module is not None and _any_training(self.module):
            self.module.eval()
        n = batch.shape[0]
        x = batch.to(self.device, non_blocking=True)
        if self.compile_backend is not None:  # outside inference mode: the graph's guards see one kind of tensor
            x = self._pad_static(x)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        forward = self._compiled_forward() if self.compile_backend is not None else self.forward
        bf16 = self.precision == "bfloat16"
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16), \
                _cudnn_benchmark(self.cudnn_benchmark):
            out = forward(x)[:n]
        if out.dtype != torch.float32:
            out = out.float()
        expected = (n, *self.output_shape)
        if tuple(out.shape) != expected:
            raise RuntimeError(f"{self.spec}: encoder returned shape {tuple(out.shape)}, expected {expected}")
        return out

    def _pad_static(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` padded to ``static_batch`` rows, so that the compiled forward sees one shape.

        Extraction's last batch of a run (or of a chunk) is smaller than the others; a compiled
        graph would recompile for it. Padding with copies of the last row (a real input, so no
        NaN from an all-zero row) keeps one shape; ``encode`` drops the padded rows' outputs, and
        each row's output does not depend on the others (eval mode). ``static_batch`` is the
        largest batch seen so far, so a run whose first batch is full compiles exactly once.
        """
        self.static_batch = max(self.static_batch or 0, x.shape[0])
        return pad_batch(x, self.static_batch)

    def _compiled_forward(self) -> Any:
        """``torch.compile(self.forward)`` with static shapes, built on first use."""
        if self._compiled is None:
            self._compiled = torch.compile(self.forward, backend=self.compile_backend, dynamic=False)
        return self._compiled

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the compiled forward (rebuilt on first use in the new process)."""
        return {**self.__dict__, "_compiled": None}

    def to(self, device: str | torch.device) -> Encoder:
        """Move the model to ``device`` (``"auto"`` allowed); returns self for chaining."""
        self.device = resolve_device(device)
        if self.module is not None:
            self.module.to(self.device)
        self._compiled = None  # guarded on the parameters' device: compile afresh for the new one
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, modality={self.modality!r}, " \
               f"output_shape={self.output_shape}, device={str(self.device)!r})"


def _any_training(module: torch.nn.Module) -> bool:
    """True when ``module`` or any submodule is in training mode.

    The top module's flag is not enough: a submodule assigned after ``eval()`` (a new head, a
    ``reset_classifier``) starts in training mode, and its dropout or batch-norm statistics would
    make a clip's features depend on chance and on the other clips of its batch.
    """
    return any(m.training for m in module.modules())


def pad_batch(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with copies of its last row appended up to ``rows`` rows (``x`` itself when full)."""
    missing = rows - x.shape[0]
    if missing <= 0:
        return x
    return torch.cat([x, x[-1:].expand(missing, *x.shape[1:])])


@contextlib.contextmanager
def _cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """``torch.backends.cudnn.benchmark = True`` for the duration (nothing when not ``enabled``),
    so one encoder's choice does not change how the others in the process run."""
    if not enabled:
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before
