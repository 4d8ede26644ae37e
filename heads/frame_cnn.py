"""The paper's video CNNs (V01-V03): a whole timm backbone fine-tuned on stored frames.

Input is one stored frame, ``uint8 [3, S, S]`` from a ``frames/<S>`` feature set (the loader hands it
over as float 0..255). On the training device, per batch: scale to [0, 1], an optional resize to
``image_size``, and in training only the paper's augmentation (Section 3, "Experimental setting for
2.2"), with ``torchvision.transforms.v2``:

* ``RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.5, 1.5))``
* ``ColorJitter()`` with PyTorch's default arguments, which the paper says it kept: those are all
  zero, so the transform is the identity. We keep it literal (``color_jitter`` = [0, 0, 0, 0]) and
  make the four factors a config field; this reading is an interpretation.
* ``GaussianBlur(kernel_size=11)`` (sigma drawn from PyTorch's default (0.1, 2.0))
* ``RandomErasing()`` (p 0.5, PyTorch's defaults), applied after the ImageNet normalisation, as
  torchvision's reference recipes do, so an erased box holds the mean colour (our interpretation:
  the paper does not say where in the pipeline it sits).

A v2 transform draws one set of random parameters per call, even on a batch; the paper's transforms
ran per image in a DataLoader. So the head calls the transforms once per frame, on the device, so
that every frame gets its own draw; the random numbers come from torch's global generator, which the
trainer reseeds every epoch (runs stay deterministic on the CPU).

Then ImageNet mean/std normalisation (the timm backbones' pretrained statistics) and the backbone with
a ``n_classes`` classifier. Predictions are per frame: the trainer's validation averages a clip's
frame probabilities; ``heads.predict`` stores them per frame (frames on the segment axis) and fusion
averages them per clip, as for every head's segments.
"""
from __future__ import annotations

from dataclasses import field
from typing import Annotated, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from featurestore.typed_config import typed_config
from heads._registry import Head, register_head
from heads.backbones import create_backbone
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
    mean: _fixed(float, 3) = field(default_factory=lambda: list(IMAGENET_MEAN))  # normalisation on the [0, 1] scale
    std: _fixed(Positive, 3) = field(default_factory=lambda: list(IMAGENET_STD))
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
        self.register_buffer("mean", torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        # Not submodules: they hold no state, and keeping them out keeps state_dict() the backbone's.
        object.__setattr__(self, "_geometric", _geometric_transforms(cfg))
        object.__setattr__(self, "_erase", _erasing(cfg))

    @classmethod
    def store_config(cls, infos: list, n_classes: int) -> dict:
        if len(infos) != 1:
            raise ValueError(f"frame_cnn takes one frames feature set, got {[i.name for i in infos]}")
        shape = [int(s) for s in infos[0].feature_shape]
        if len(shape) != 3 or shape[0] != 3:
            raise ValueError(f"feature set {infos[0].name!r} has per-frame shape {shape}; frame_cnn needs stored "
                             f"frames [3, S, S] (extract them with the encoder 'frames/<S>', e.g. frames/448)")
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
        x = frames.float() / 255.0
        size = self.cfg.image_size
        if size and size != x.shape[-1]:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        augment = self.training and self.cfg.augment
        if augment and self._geometric is not None:
            x = torch.stack([self._geometric(frame) for frame in x])
        x = (x - self.mean) / self.std
        if augment and self._erase is not None:
            x = torch.stack([self._erase(frame) for frame in x])
        return x

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        self.check_inputs(inputs, 1)
        return self.backbone(self.images(inputs[0]))


def _geometric_transforms(cfg: FrameCNNConfig):
    """RandomAffine, then ColorJitter (only when a factor is non-zero) and GaussianBlur (unless off), as one v2 pipeline."""
    from torchvision.transforms import v2

    steps = [v2.RandomAffine(degrees=cfg.affine_degrees, translate=tuple(cfg.affine_translate),
                             scale=tuple(cfg.affine_scale))]
    if any(cfg.color_jitter):
        brightness, contrast, saturation, hue = cfg.color_jitter
        steps.append(v2.ColorJitter(brightness, contrast, saturation, hue))
    if cfg.blur_kernel:
        steps.append(v2.GaussianBlur(cfg.blur_kernel, sigma=tuple(cfg.blur_sigma)))
    return v2.Compose(steps)


def _erasing(cfg: FrameCNNConfig):
    from torchvision.transforms import v2

    return v2.RandomErasing(p=cfg.erasing_p) if cfg.erasing_p > 0 else None
