"""The shared preprocessors: checked audio segments, and frame resize + centre crop + normalise.

Both are small frozen dataclasses holding no model, so they pickle as plain data and run in
DataLoader worker processes (see ``Encoder.preprocessor``). Frame preprocessing is split in two for
extraction: the workers only check and hand over uint8 frames (``as_uint8_frames``), and
``FramePreprocessor.batched`` resizes, crops and normalises whole encode batches on the encoder's
device; calling the preprocessor runs both halves on one clip on the host.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


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
        """One clip's frames on the host: ``uint8 [K, H, W, 3]`` -> ``float32 [K, 3, h, w]``."""
        return self.batched(as_uint8_frames(frames))

    def batched(self, frames: torch.Tensor) -> torch.Tensor:
        """Resize, crop and normalise a stack of equally sized frames where they are.

        ``uint8 [N, H, W, 3]`` on any device -> ``float32 [N, 3, h, w]`` on the same device.
        Extraction on an accelerator hands decoded uint8 frames to the encoder's device and calls
        this once per encode batch, so the decode workers never resize and only ``H x W x 3`` bytes
        per frame cross shared memory (``featurestore.extract.workers``). On a GPU the whole stack is one op per step; on the CPU it goes in
        slices of about ``CPU_SLICE_BYTES`` of float intermediate, because a large float stack
        costs more in fresh pages than it saves (a 720p frame is 11 MB as float32). Every op is
        per frame (antialiased interpolation is separable and frame-independent), so on the CPU the
        output is bit for bit the one a frame gets alone: stored features and fingerprints are those
        of the per-frame preprocessing this replaced.
        """
        check_frame_tensor(frames)
        out = torch.empty((frames.shape[0], 3, *self.crop), dtype=torch.float32, device=frames.device)
        if frames.shape[0] == 0:
            return out
        mean, std = _channel_stats(self.mean, self.std, frames.device)
        step = frames.shape[0]
        if frames.device.type == "cpu":
            step = max(1, CPU_SLICE_BYTES // (4 * frames[0].numel()))
        for lo in range(0, frames.shape[0], step):
            x = frames[lo:lo + step].permute(0, 3, 1, 2).float()  # channels-last: the cheapest conversion
            x = _center_crop(self._resize(x), self.crop)
            out[lo:lo + step] = (x / 255.0 - mean) / std
        return out

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        size = self.resized_size(x.shape[-2], x.shape[-1])
        if size == tuple(x.shape[-2:]):
            return x
        if self.interpolation == "nearest":
            return F.interpolate(x, size=size, mode="nearest")
        x = F.interpolate(x, size=size, mode=self.interpolation, align_corners=False, antialias=True)
        return x.clamp_(0.0, 255.0).round_()


#: On the CPU, ``FramePreprocessor.batched`` converts frames to float in slices of about this size.
CPU_SLICE_BYTES = 16 << 20


@functools.lru_cache(maxsize=64)
def _channel_stats(mean: tuple[float, ...], std: tuple[float, ...],
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as float32 ``[1, 3, 1, 1]`` tensors on ``device``, made once (no copy to a GPU
    per batch)."""
    return (torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1),
            torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1))


def as_uint8_frames(frames: np.ndarray) -> torch.Tensor:
    """The decode workers' half of frame preprocessing: check ``uint8 [K, H, W, 3]`` RGB, wrap as a tensor.

    Every image encoder whose preprocessor has a ``batched`` step shares this one function, so the
    workers hand one uint8 tensor per clip to all of them (no float copy, no per-encoder copy).
    """
    if not (isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and is_frame_stack(frames.shape)):
        found = f"{frames.dtype} array of shape {frames.shape}" if isinstance(frames, np.ndarray) \
            else type(frames).__name__
        raise ValueError(f"expected uint8 RGB frames [K, H, W, 3], got {found}")
    return torch.from_numpy(np.ascontiguousarray(frames))


def is_frame_stack(shape: tuple[int, ...]) -> bool:
    """``[K, H, W, 3]`` with frames of at least one pixel (a 0-pixel side would divide by zero
    in the resize, far from the clip that had it)."""
    return len(shape) == 4 and shape[-1] == 3 and shape[1] >= 1 and shape[2] >= 1


def check_frame_tensor(frames: torch.Tensor) -> None:
    """Refuse anything but a ``uint8 [N, H, W, 3]`` tensor (what ``as_uint8_frames`` hands over)."""
    if not (isinstance(frames, torch.Tensor) and frames.dtype == torch.uint8 and is_frame_stack(frames.shape)):
        found = f"{frames.dtype} tensor of shape {tuple(frames.shape)}" if isinstance(frames, torch.Tensor) \
            else type(frames).__name__
        raise ValueError(f"expected a uint8 RGB frame tensor [N, H, W, 3], got {found}")


def check_normalised_batch(batch: torch.Tensor, spec: str) -> None:
    """Refuse an integer batch handed to an image model's ``encode``: raw uint8 pixels (stored
    ``frames/<size>`` ones, say) are not the normalised floats the model takes, and ``float()``
    of them gives features of a picture 255 times too bright, without a word."""
    if not batch.is_floating_point():
        raise ValueError(f"{spec}: encode() takes the preprocessor's normalised float frames [B, 3, h, w], got a "
                         f"{batch.dtype} batch of shape {tuple(batch.shape)}; pass uint8 RGB frames [K, H, W, 3] "
                         f"through encoder.preprocessor() first")


def _center_crop(x: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    """Center crop with torchvision's offsets (``round((H - h) / 2)``)."""
    height, width = x.shape[-2:]
    if height < crop[0] or width < crop[1]:
        raise ValueError(f"cannot crop {tuple(crop)} from a {height}x{width} resized frame")
    top = int(round((height - crop[0]) / 2.0))
    left = int(round((width - crop[1]) / 2.0))
    return x[..., top:top + crop[0], left:left + crop[1]]
