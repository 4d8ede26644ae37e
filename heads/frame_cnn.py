"""The paper's video CNNs (V01-V03): a whole timm backbone fine-tuned on stored frames.

Input is one stored frame, ``uint8 [3, S, S]`` from a ``frames/<S>`` feature set (the loader hands it
over as float 0..255). On the training device, per batch: scale to [0, 1], an optional resize to
``image_size``, and in training only the paper's augmentation (Section 3, "Experimental setting for
2.2"), with torchvision's transforms' parameters and defaults:

* ``RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.5, 1.5))``
* ``ColorJitter()`` with PyTorch's default arguments, which the paper says it kept: those are all
  zero, so the transform is the identity. We keep it literal (``color_jitter`` = [0, 0, 0, 0]) and
  make the four factors a config field; this reading is an interpretation.
* ``GaussianBlur(kernel_size=11)`` (sigma drawn from PyTorch's default (0.1, 2.0))
* ``RandomErasing()`` (p 0.5, PyTorch's defaults), applied after the mean/std normalisation, as
  torchvision's reference recipes do, so an erased box holds the mean colour (our interpretation:
  the paper does not say where in the pipeline it sits).

torchvision's v2 transforms draw one set of random parameters per call, even on a batch, and the
paper's ran per image in a DataLoader; calling them once per frame cost ~70 dispatched operations,
6 host syncs and 3 blocking copies to the device per frame. So the head draws every frame's
parameters at once, on the device, with the same distributions as torchvision (`AugmentParams`),
and applies them batched: one ``affine_grid``/``grid_sample`` for the affine transforms (nearest,
zero fill: RandomAffine's defaults), the blur as one grouped convolution (a per-frame separable Gaussian, reflect-padded as
``gaussian_blur``), erasing as box masks. The number of operations per batch does not depend on the
batch size, and nothing reads a value back to the host (tests/heads/test_gpu_ready.py). For the same
parameters the result equals torchvision's functional transforms (up to float rounding, which can move
a nearest-neighbour sample at a pixel boundary). The random numbers come from torch's generator of
the frames' device, which the trainer reseeds every epoch (runs stay deterministic on the CPU); they
are drawn in another order than torchvision's, so the augmentation of a given seed differs from the
per-frame one's. ColorJitter's four factors, when set, are also per frame but applied in the fixed
order brightness, contrast, saturation, hue (torchvision draws an order per call).

Then mean/std normalisation with the backbone's own pretrained statistics (timm's ``pretrained_cfg``:
ImageNet's for the paper's CNNs, 0.5/0.5 for e.g. ``inception_v3.tf_in1k``) and the backbone with
a ``n_classes`` classifier. Predictions are per frame: the trainer's validation averages a clip's
frame probabilities; ``heads.predict`` stores them per frame (frames on the segment axis) and fusion
averages them per clip, as for every head's segments.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from featurestore.typed_config import typed_config
from heads._registry import Head, register_head
from heads.backbones import create_backbone, full_precision
from heads.config import ConfigError, Count, Name, NonNegative, Positive, Probability, Size

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def _fixed(item: Any, n: int) -> Any:
    """A list of exactly ``n`` items of type ``item``."""
    return Annotated[list[item], Field(min_length=n, max_length=n)]


@typed_config(ConfigError)
class FrameCNNConfig:
    backbone: Name = "regnetx_064"  # any timm model (paper V01-V03: regnetx_064, resnest50d, hrnet_w18)
    weights: Name = "random"  # "random" | "pretrained" | "pretrained:<tag>" | path to a local checkpoint
    seed: Count = 0  # seed of random backbone weights
    n_classes: Size = 10  # output classes
    input_shape: list[Size] = field(default_factory=lambda: [3, 448, 448])  # stored frame [3, S, S] (the head checks the form)
    image_size: Size | None = None  # size fed to the backbone; None: the stored size (paper: 448)
    mean: _fixed(float, 3) | None = None  # normalisation on the [0, 1] scale; None: the backbone's own (timm pretrained_cfg)
    std: _fixed(Positive, 3) | None = None  # None: the backbone's own; both are recorded resolved in run.json
    augment: bool = True  # training-time augmentation (all of the below); False turns it off
    affine_degrees: NonNegative = 10.0  # RandomAffine rotation range +-degrees
    affine_translate: _fixed(Probability, 2) = field(default_factory=lambda: [0.1, 0.1])  # RandomAffine translate (fractions)
    affine_scale: _fixed(Positive, 2) = field(default_factory=lambda: [0.5, 1.5])  # RandomAffine scale range
    color_jitter: _fixed(NonNegative, 4) = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])  # brightness, contrast, saturation, hue (PyTorch defaults: identity)
    blur_kernel: Count = 11  # GaussianBlur kernel size (odd); 0 turns it off
    blur_sigma: _fixed(Positive, 2) = field(default_factory=lambda: [0.1, 2.0])  # GaussianBlur sigma range
    erasing_p: Probability = 0.5  # RandomErasing probability (PyTorch default); 0 turns it off
    drop_rate: Probability = 0.0  # dropout before the backbone's classifier


@register_head
class FrameCNN(Head):
    """A timm CNN fine-tuned end to end on stored frames (one sample = one frame)."""

    name = "frame_cnn"
    config_class = FrameCNNConfig
    default_batch_size = 20  # the paper's video batch size
    default_family = "video"
    #: Stored frames are large (a 12-frame 448 px clip is 7.2 MB): the trainer caps the read
    #: group (clips read at once and shuffled together) so that one holds at most this many bytes of stored clips. The loader holds at most two
    #: read groups (the one being trained on and the next being read), so the data path peaks at about
    #: twice this plus the store's chunk cache, whatever the dataset size (docs/benchmarks.md); blocks
    #: of clips are still shuffled across the whole split every epoch.
    max_read_group_bytes: ClassVar[int | None] = 256 << 20

    def __init__(self, cfg: FrameCNNConfig):
        super().__init__(cfg)
        shape = list(cfg.input_shape)
        if len(shape) != 3 or shape[0] != 3 or shape[1] != shape[2]:
            raise ValueError(f"frame_cnn needs square RGB frames [3, S, S], got input_shape {shape}")
        self.backbone, self._weights = create_backbone(cfg.backbone, cfg.weights, num_classes=cfg.n_classes,
                                                       in_chans=3, seed=cfg.seed, drop_rate=cfg.drop_rate)
        if cfg.mean is None or cfg.std is None:
            self.cfg = cfg = dataclasses.replace(cfg, **backbone_statistics(self.backbone, cfg))
        self.register_buffer("mean", torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def store_config(cls, infos: list, n_classes: int) -> dict:
        if len(infos) != 1:
            raise ValueError(f"frame_cnn takes one frames feature set, got {[i.name for i in infos]}")
        shape = [int(s) for s in infos[0].feature_shape]
        if len(shape) != 3 or shape[0] != 3:
            raise ValueError(f"feature set {infos[0].name!r} has per-frame shape {shape}; frame_cnn needs stored "
                             f"frames [3, S, S] (extract them with the encoder 'frames/<S>', e.g. frames/448)")
        if str(infos[0].dtype) != "uint8":  # images() divides by 255: 0..1 or normalised values would be ~black
            raise ValueError(f"feature set {infos[0].name!r} is stored as {infos[0].dtype}; frame_cnn reads uint8 "
                             f"frames (0..255) as the encoder 'frames/<S>' stores them, e.g. frames/448")
        return {"input_shape": shape, "n_classes": n_classes}

    @classmethod
    def loading_config(cls, config: dict) -> dict:
        """Trained weights replace the backbone's anyway: build it random, so nothing is fetched."""
        return {**config, "weights": "random"}

    def backbone_weights(self) -> dict:
        return dict(self._weights)

    def images(self, frames: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` frames (0..255) -> the normalised (and, training, augmented) backbone input."""
        expected = tuple(self.cfg.input_shape)
        if tuple(frames.shape[1:]) != expected:
            raise ValueError(f"frame_cnn expects frames of shape {expected}, got {tuple(frames.shape[1:])}")
        x = frames.float() / 255.0  # float32: callers run this outside autocast (`full_precision`)
        size = self.cfg.image_size
        if size and size != x.shape[-1]:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        params = AugmentParams.draw(self.cfg, x) if self.training and self.cfg.augment else None
        if params is not None:
            x = params.geometric(x)
        x = (x - self.mean) / self.std
        if params is not None and params.boxes is not None:
            x = erase_boxes(x, params.boxes)
        return x

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        self.check_inputs(inputs, 1)
        with full_precision(inputs[0].device):
            images = self.images(inputs[0])
        return self.backbone(images)


def backbone_statistics(backbone: torch.nn.Module, cfg: FrameCNNConfig) -> dict[str, list[float]]:
    """The unset of ``mean`` / ``std``: the backbone's pretrained statistics (timm's ``pretrained_cfg``).

    Why: pretrained backbones expect their own input statistics (ImageNet's for most CNNs, 0.5 / 0.5
    for ``inception_v3.tf_in1k`` or ViTs); fixed ImageNet values fed those a shifted input, silently.
    The resolved values go into the head's config, so run.json records them and a loaded run uses them
    whatever timm version is installed then.
    """
    pretrained = getattr(backbone, "pretrained_cfg", None) or {}
    mean, std = pretrained.get("mean", IMAGENET_MEAN), pretrained.get("std", IMAGENET_STD)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"frame_cnn: backbone {cfg.backbone!r} has input statistics mean={list(mean)}, "
                         f"std={list(std)}, not 3 channels: set mean and std in the head config")
    return {"mean": [float(v) for v in mean] if cfg.mean is None else list(cfg.mean),
            "std": [float(v) for v in std] if cfg.std is None else list(cfg.std)}


@dataclass
class AugmentParams:
    """Every frame's random augmentation parameters for one batch, drawn at once on the frames' device.

    The distributions are torchvision's (``RandomAffine.make_params``, ``GaussianBlur``'s sigma,
    ``ColorJitter``'s factors, ``RandomErasing.make_params``); a transform that is off has None.
    """

    cfg: FrameCNNConfig
    angle: torch.Tensor  # [B] degrees, U(-affine_degrees, affine_degrees)
    shift: torch.Tensor  # [B, 2] whole pixels (x, y): round(U(-t * size, t * size))
    scale: torch.Tensor  # [B] U(affine_scale)
    jitter: torch.Tensor | None  # [B, 4] brightness, contrast, saturation factors and hue shift
    sigma: torch.Tensor | None  # [B] blur sigma, U(blur_sigma)
    boxes: torch.Tensor | None  # [B, 4] erased box (top, left, height, width); height 0: not erased

    @classmethod
    def draw(cls, cfg: FrameCNNConfig, x: torch.Tensor) -> "AugmentParams":
        """Parameters for the ``[B, 3, H, W]`` batch ``x`` (a few ``torch.rand`` calls, whatever B)."""
        n, _, height, width = x.shape
        u = torch.rand(n, 4, device=x.device)
        angle = (u[:, 0] * 2 - 1) * cfg.affine_degrees
        shift = torch.stack([torch.round((u[:, 1] * 2 - 1) * (cfg.affine_translate[0] * width)),
                             torch.round((u[:, 2] * 2 - 1) * (cfg.affine_translate[1] * height))], dim=1)
        low, high = cfg.affine_scale
        scale = low + u[:, 3] * (high - low)
        jitter = _draw_jitter(cfg.color_jitter, n, x.device) if any(cfg.color_jitter) else None
        sigma = None
        if cfg.blur_kernel:
            low, high = cfg.blur_sigma
            sigma = low + torch.rand(n, device=x.device) * (high - low)
        boxes = draw_boxes(n, height, width, cfg.erasing_p, x.device) if cfg.erasing_p > 0 else None
        return cls(cfg, angle, shift, scale, jitter, sigma, boxes)

    def geometric(self, x: torch.Tensor) -> torch.Tensor:
        """RandomAffine, ColorJitter (when a factor is set) and GaussianBlur (unless off), on [0, 1] frames."""
        x = affine(x, self.angle, self.shift, self.scale)
        if self.jitter is not None:
            x = color_jitter(x, self.jitter, self.cfg.color_jitter)
        if self.sigma is not None:
            x = gaussian_blur(x, self.sigma, self.cfg.blur_kernel)
        return x


def affine(x: torch.Tensor, angle: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Rotate by ``angle`` degrees about the centre, scale and shift every frame of ``x`` (one grid_sample).

    The inverse map is torchvision's ``_get_inverse_affine_matrix`` (no shear, centre of the image), in
    pixel units from the centre, then rescaled to ``affine_grid``'s [-1, 1] coordinates.
    """
    n, _, height, width = x.shape
    rot = torch.deg2rad(angle)
    cos, sin = torch.cos(rot) / scale, torch.sin(rot) / scale
    tx, ty = shift[:, 0], shift[:, 1]
    theta = torch.stack([cos, sin * (height / width), -(cos * tx + sin * ty) * (2 / width),
                         -sin * (width / height), cos, (sin * tx - cos * ty) * (2 / height)], dim=1)
    grid = F.affine_grid(theta.view(n, 2, 3).to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur every frame with its own ``sigma``: torchvision's kernel, reflect padding, one grouped
    convolution per axis (the 2-D Gaussian is separable), every channel of every frame a group."""
    n, c, height, width = x.shape
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    pos = torch.linspace(-lim, lim, steps=kernel_size, dtype=x.dtype, device=x.device)
    kernel = torch.softmax(-(pos / sigma.to(x.dtype).view(n, 1)) ** 2, dim=1).repeat_interleave(c, dim=0)
    half = kernel_size // 2
    flat = F.pad(x.reshape(1, n * c, height, width), (half, half, half, half), mode="reflect")
    flat = F.conv2d(flat, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    flat = F.conv2d(flat, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    return flat.view(n, c, height, width)


def draw_boxes(n: int, height: int, width: int, p: float, device: torch.device,
               scale: tuple[float, float] = (0.02, 0.33), ratio: tuple[float, float] = (0.3, 3.3),
               tries: int = 10) -> torch.Tensor:
    """RandomErasing's boxes ``[n, 4]`` (top, left, height, width; height 0 where nothing is erased).

    As torchvision: erase with probability ``p``; up to ``tries`` (area, aspect) draws, the first box
    that fits is used (none fits: nothing erased); its position uniform over the places it fits.
    All tries are drawn at once and the first fitting one picked, so no loop depends on the data.
    """
    u = torch.rand(n, 2 * tries + 3, device=device)
    area = height * width * (scale[0] + u[:, :tries] * (scale[1] - scale[0]))
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_low + u[:, tries:2 * tries] * (log_high - log_low))
    box_h, box_w = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    fits = (box_h < height) & (box_w < width)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first try that fits (0 when none does)
    box_h, box_w = box_h.gather(1, first).squeeze(1), box_w.gather(1, first).squeeze(1)
    erased = (u[:, -3] < p) & fits.any(dim=1)
    box_h = torch.where(erased, box_h, torch.zeros_like(box_h))
    top = torch.floor(u[:, -2] * (height - box_h + 1))
    left = torch.floor(u[:, -1] * (width - box_w + 1))
    return torch.stack([top, left, box_h, box_w], dim=1).long()


def erase_boxes(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Set each frame's box (all channels) to 0: after normalisation, the mean colour."""
    n, _, height, width = x.shape
    top, left, box_h, box_w = (boxes[:, i].view(n, 1, 1) for i in range(4))
    rows = torch.arange(height, device=x.device).view(1, height, 1)
    cols = torch.arange(width, device=x.device).view(1, 1, width)
    inside = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
    return x.masked_fill(inside.unsqueeze(1), 0.0)


def _draw_jitter(factors: list[float], n: int, device: torch.device) -> torch.Tensor:
    """ColorJitter's per-frame factors: brightness, contrast, saturation U(max(0, 1 - f), 1 + f); hue U(-h, h)."""
    u = torch.rand(n, 4, device=device)
    columns = [max(0.0, 1 - f) + u[:, i] * (1 + f - max(0.0, 1 - f)) for i, f in enumerate(factors[:3])]
    columns.append((u[:, 3] * 2 - 1) * factors[3])
    return torch.stack(columns, dim=1)


def color_jitter(x: torch.Tensor, jitter: torch.Tensor, factors: list[float]) -> torch.Tensor:
    """torchvision's adjust_brightness/contrast/saturation/hue with per-frame factors, in that order;
    an adjustment whose configured factor is 0 is skipped, as ColorJitter skips it."""
    n = x.shape[0]
    brightness, contrast, saturation, hue = (jitter[:, i].view(n, 1, 1, 1) for i in range(4))
    if factors[0]:
        x = (x * brightness).clamp(0, 1)
    if factors[1]:
        mean = _grey(x).mean(dim=(-3, -2, -1), keepdim=True)
        x = (contrast * x + (1 - contrast) * mean).clamp(0, 1)
    if factors[2]:
        x = (saturation * x + (1 - saturation) * _grey(x)).clamp(0, 1)
    if factors[3]:
        h, s, v = _rgb_to_hsv(x)
        x = _hsv_to_rgb((h + hue.view(n, 1, 1)) % 1.0, s, v)
    return x


def _grey(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, g, b = x.unbind(dim=1)
    high, low = x.amax(dim=1), x.amin(dim=1)
    spread = high - low
    safe = torch.where(spread > 0, spread, torch.ones_like(spread))
    hue = torch.where(high == r, (g - b) / safe, torch.where(high == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = torch.where(spread > 0, (hue / 6) % 1.0, torch.zeros_like(hue))
    return hue, spread / torch.where(high > 0, high, torch.ones_like(high)), high


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The closed form ``v - v s clamp(min(k, 4 - k), 0, 1)``, ``k = (m + 6h) mod 6``, m = 5, 3, 1: no lookup table."""
    channels = []
    for m in (5, 3, 1):
        k = (m + h * 6) % 6
        channels.append(v - v * s * torch.minimum(k, 4 - k).clamp(0, 1))
    return torch.stack(channels, dim=1)
