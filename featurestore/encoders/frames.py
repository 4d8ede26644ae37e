"""``frames/<size>``: the sampled video frames themselves, resized to ``size x size``, stored as uint8.

The paper's strongest video models (V01-V03) fine-tune whole ImageNet CNNs on 448x448 frames with
augmentation, so a head has to see the pixels, not a frozen embedding. This "encoder" does no
learning: it decodes the clip's K frames once (12 per development clip, 5 per evaluation clip, the
paper's sampling, see ``featurestore.decode.video``), resizes the *whole* frame to ``size x size``
(the aspect ratio is not kept and nothing is cropped: the paper's "Resized to 448 x 448 x 3"), and
stores it as ``uint8 [3, size, size]`` (channels first, the layout torch feeds to a CNN; planes of
one colour also compress better than interleaved RGB). The ``frame_cnn`` head then trains on them
straight from the store, so an epoch never decodes an MP4.

Spec: ``frames`` (= ``frames/448``, the paper's size) or ``frames/<size>`` (``frames/224``,
``frames/64`` for demos). The size is in the feature-set name, so several sizes can live in one store.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from featurestore.encoders._encoder import Encoder
from featurestore.encoders._names import EncoderSpec, SpecError
from featurestore.encoders._preprocess import is_frame_stack
from featurestore.encoders._registry import register_encoder

#: The paper's frame size (Section 3, "Resized to 448 x 448 x 3").
PAPER_SIZE = 448
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class FrameResize:
    """``uint8 [K, H, W, 3]`` RGB frames -> ``uint8 [K, 3, size, size]``: the whole frame, squashed.

    Antialiased interpolation (the kernel PIL uses, which torchvision's ``Resize`` on PIL images
    calls), rounded to the uint8 grid. Frames are resized one at a time so a 12 x 1080p stack never
    exists as floats. Picklable plain data: it runs in extraction's DataLoader workers.

    Attributes:
        size: output side in pixels.
        interpolation: ``bilinear`` (torchvision's default), ``bicubic`` or ``nearest``.
    """

    size: int
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {_INTERPOLATIONS}")
        if int(self.size) < 1:
            raise ValueError(f"frame size must be >= 1, got {self.size}")

    def config(self) -> dict[str, Any]:
        return {"resize": [int(self.size), int(self.size)], "crop": None, "keep_aspect": False,
                "interpolation": self.interpolation, "antialias": self.interpolation != "nearest",
                "rounding": "round to nearest, clamp to 0..255", "layout": "CHW", "channels": "RGB"}

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        if not (isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and is_frame_stack(frames.shape)):
            found = f"{frames.dtype} array of shape {frames.shape}" if isinstance(frames, np.ndarray) \
                else type(frames).__name__
            raise ValueError(f"expected uint8 RGB frames [K, H, W, 3], got {found}")
        size = (int(self.size), int(self.size))
        out = torch.empty((frames.shape[0], 3, *size), dtype=torch.uint8)
        for i, frame in enumerate(frames):
            x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)
            if tuple(x.shape[1:]) == size:
                out[i] = x
                continue
            x = x.unsqueeze(0).float()
            if self.interpolation == "nearest":
                x = F.interpolate(x, size=size, mode="nearest")
            else:
                x = F.interpolate(x, size=size, mode=self.interpolation, align_corners=False, antialias=True)
            out[i] = x[0].round_().clamp_(0, 255).to(torch.uint8)
        return out


@register_encoder("frames")
class FramesEncoder(Encoder):
    """The K sampled frames of each clip as ``uint8 [3, size, size]`` (no model; see the module doc)."""

    modality = "video"
    dtype = "uint8"
    #: Lossless compression asked of the store for this feature set (frames are ~10x larger than any
    #: embedding); extraction passes it to ``create_feature_set`` when the store supports it.
    compressor: ClassVar[str | None] = "zstd"
    smoke_spec = "frames/32"
    runs_on_host = True  # its uint8 output would cross to the device and back for a dtype change

    def __init__(self, spec: str | EncoderSpec = "frames", interpolation: str = "bilinear") -> None:
        super().__init__(spec)
        size = parse_size(self._spec)
        self._spec = EncoderSpec("frames", str(size), None)  # canonical: 'frames' -> 'frames/448'
        self.size = size
        self._preprocessor = FrameResize(size, interpolation)

    @classmethod
    def check_spec(cls, spec: EncoderSpec) -> None:
        parse_size(spec)

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (3, self.size, self.size)

    def config(self) -> dict[str, Any]:
        return {"kind": "frames", "preprocess": self._preprocessor.config()}

    def preprocessor(self) -> FrameResize:
        return self._preprocessor

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        # float32 out (the Encoder contract); values are whole numbers 0..255, so the uint8 cast on
        # writing is exact.
        return batch.float()


def parse_size(spec: EncoderSpec) -> int:
    """The frame size of ``frames[/<size>]``; weights make no sense for a model-free encoder."""
    if spec.weights is not None:
        raise SpecError(f"encoder spec {str(spec)!r}: frames takes no weights; use 'frames/<size>', "
                        f"e.g. 'frames/{PAPER_SIZE}'")
    if spec.model is None:
        return PAPER_SIZE
    text = spec.model.lower()
    if "x" in text:  # 'frames/448x448' is accepted; only square frames are stored
        height, _, width = text.partition("x")
        if height != width:
            raise SpecError(f"encoder spec {str(spec)!r}: frames are resized to a square; give one size, "
                            f"e.g. 'frames/{PAPER_SIZE}'")
        text = height
    if not text.isdigit() or not 8 <= int(text) <= 4096:
        raise SpecError(f"encoder spec {str(spec)!r}: expected 'frames/<size>' with a size of 8-4096 pixels, "
                        f"e.g. 'frames/{PAPER_SIZE}'")
    return int(text)
