"""The paper's log-mel CNN (A01-A03): a timm backbone on [log-mel, delta, delta-delta] as 3 channels.

Input is the stored log-mel of one 1 s segment, ``[n_mels, frames]`` (``[256, 94]`` with the paper's
parameters). Per batch, on the training device: deltas (librosa-compatible, width 9), stacking as 3
channels, a learned input normalisation (BatchNorm2d over the channels, so that a gain in dB stays
meaningful, unlike a per-sample standardisation which would undo it), a resize to ``256 x 100``, and
during training only: a random gain (dB offset, as the log-mel is in dB) and frequency masking
(SpecAugment-style bands set to the normalised mean, 0).
"""
from __future__ import annotations

from dataclasses import field
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from featurestore.typed_config import typed_config
from heads._registry import Head, register_head
from heads.backbones import create_backbone, full_precision
from heads.config import ConfigError, Count, Name, NonNegative, Probability, Size
from heads.deltas import delta_kernels, with_deltas


@typed_config(ConfigError)
class SpectrogramCNNConfig:
    backbone: Name = "regnetx_064"  # any timm model name (paper: regnetx_064, resnest50d, tf_efficientnet_b1)
    weights: Name = "random"  # "random" | "pretrained" | "pretrained:<tag>" | path to a local checkpoint
    seed: Count = 0  # seed of random backbone weights
    n_classes: Size = 10  # output classes
    input_shape: list[Size] = field(default_factory=lambda: [256, 94])  # stored log-mel [n_mels, frames] (the head checks the form)
    resize_to: list[Size] = field(default_factory=lambda: [256, 100])  # image size fed to the backbone, [mels, frames]
    delta_width: Annotated[int, Field(ge=3)] = 9  # librosa.feature.delta width (odd, >= 3)
    gain_db: NonNegative = 6.0  # training: add U(-gain_db, gain_db) dB per sample; 0 turns it off
    freq_mask_width: Count = 32  # training: max mel bins per frequency mask (after resize); 0 turns it off
    freq_masks: Count = 1  # training: masks per sample
    drop_rate: Probability = 0.0  # dropout before the backbone's classifier


@register_head
class SpectrogramCNN(Head):
    """timm CNN over 3-channel log-mel images (one sample = one audio segment)."""

    name = "spectrogram_cnn"
    config_class = SpectrogramCNNConfig
    default_batch_size = 24
    default_family = "audio"

    def __init__(self, cfg: SpectrogramCNNConfig):
        super().__init__(cfg)
        if len(cfg.input_shape) != 2 or len(cfg.resize_to) != 2:
            raise ValueError(f"input_shape and resize_to must be [mels, frames], got {cfg.input_shape}, {cfg.resize_to}")
        self.norm = nn.BatchNorm2d(3)
        # Built once and moved with the head: a forward pass copies nothing to the device.
        self.register_buffer("delta_kernels", delta_kernels(cfg.delta_width), persistent=False)
        self.backbone, self._weights = create_backbone(cfg.backbone, cfg.weights, num_classes=cfg.n_classes,
                                                       in_chans=3, seed=cfg.seed, drop_rate=cfg.drop_rate)

    @classmethod
    def store_config(cls, infos: list, n_classes: int) -> dict:
        if len(infos) != 1:
            raise ValueError(f"spectrogram_cnn takes one log-mel feature set, got {[i.name for i in infos]}")
        shape = [int(s) for s in infos[0].feature_shape]
        if len(shape) != 2:
            raise ValueError(f"feature set {infos[0].name!r} has per-segment shape {shape}; spectrogram_cnn "
                             f"needs a log-mel [n_mels, frames]")
        n_mels = (infos[0].provenance.get("config") or {}).get("n_mels")
        if isinstance(n_mels, int) and shape[0] != n_mels:  # transposed: deltas would run along frequency
            raise ValueError(f"feature set {infos[0].name!r} has per-segment shape {shape} but its provenance says "
                             f"n_mels={n_mels}: spectrogram_cnn needs [n_mels, frames] (time last, where the "
                             f"deltas are taken); store it as the encoder 'logmel' does")
        return {"input_shape": shape, "n_classes": n_classes}

    @classmethod
    def loading_config(cls, config: dict) -> dict:
        """Trained weights replace the backbone's anyway: build it random, so nothing is fetched."""
        return {**config, "weights": "random"}

    def backbone_weights(self) -> dict:
        return dict(self._weights)

    def images(self, logmel: torch.Tensor) -> torch.Tensor:
        """``[B, mels, frames]`` log-mel -> the ``[B, 3, *resize_to]`` images the backbone sees."""
        expected = tuple(self.cfg.input_shape)
        if tuple(logmel.shape[1:]) != expected:
            raise ValueError(f"spectrogram_cnn expects log-mel segments of shape {expected}, got {tuple(logmel.shape[1:])}")
        logmel = logmel.float()  # deltas of a float16 / bfloat16 batch would lose ~1% of their range
        if self.training and self.cfg.gain_db > 0:
            gain = (torch.rand(logmel.shape[0], 1, 1, device=logmel.device) * 2 - 1) * self.cfg.gain_db
            logmel = logmel + gain  # deltas are unchanged by a constant offset
        x = self.norm(with_deltas(logmel, self.delta_kernels))
        x = F.interpolate(x, size=tuple(self.cfg.resize_to), mode="bilinear", align_corners=False)
        if self.training and self.cfg.freq_mask_width > 0:
            x = _freq_mask(x, self.cfg.freq_mask_width, self.cfg.freq_masks)
        return x

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        self.check_inputs(inputs, 1)
        with full_precision(inputs[0].device):
            images = self.images(inputs[0])
        return self.backbone(images)


def _freq_mask(x: torch.Tensor, max_width: int, n_masks: int) -> torch.Tensor:
    """Zero ``n_masks`` random bands of up to ``max_width`` mel bins per sample (all channels)."""
    b, _, mels, _ = x.shape
    bins = torch.arange(mels, device=x.device).view(1, mels)
    keep = torch.ones(b, mels, dtype=torch.bool, device=x.device)
    for _ in range(n_masks):
        width = torch.randint(0, max_width + 1, (b, 1), device=x.device)
        start = (torch.rand(b, 1, device=x.device) * (mels - width + 1)).long()
        keep &= ~((bins >= start) & (bins < start + width))
    return x * keep.view(b, 1, mels, 1).to(x.dtype)
