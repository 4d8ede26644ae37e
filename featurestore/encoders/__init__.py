"""Encoders: turn decoded audio segments / video frames into the arrays the feature store keeps.

Public face: ``create_encoder(spec)``, ``list_encoders()``, ``register_encoder(family)``,
``parse_spec(spec)``, the ``Encoder`` base class and ``resolve_device``; for plugin authors the
weight helpers (``parse_weights`` for the ``@weights`` grammar, ``seeded`` for ``@none`` inits,
``read_state_dict`` + ``load_into`` for ``@path`` checkpoints, ``announce_random_weights``), the torch
``LogMelSpectrogram`` transform, and ``featurestore.testing.check_encoder`` for the contract. Built-in families:
``logmel``, ``timm/<model>``, ``clip/<model>``, ``cliptext/<model>``, ``frames/<size>``; plugins join through the
entry-point group ``featurestore.encoders``. See docs/encoders.md.
"""
from featurestore.encoders._device import DEVICE_HELP, resolve_device
from featurestore.encoders._encoder import Encoder
from featurestore.encoders._names import MODALITIES, EncoderSpec, SpecError, UnknownEncoderError, parse_spec
from featurestore.encoders._preprocess import AudioSegments, FramePreprocessor
from featurestore.encoders._registry import (
    ENTRY_POINT_GROUP,
    create_encoder,
    get_builder,
    list_encoders,
    refresh_plugins,
    register_encoder,
)
from featurestore.encoders._weights import (
    ALLOW_DOWNLOAD_ENV,
    DownloadRefusedError,
    Weights,
    WeightsMismatchError,
    WeightsNotFoundError,
    announce_random_weights,
    downloads_allowed,
    file_sha256,
    load_into,
    parse_weights,
    read_state_dict,
    seeded,
)
from featurestore.encoders.logmel import LogMelConfig, LogMelEncoder, LogMelSpectrogram, mel_filterbank
from featurestore.encoders.timm_frames import TimmFrameEncoder
from featurestore.encoders.clip import ClipImageEncoder, ClipTextEncoder
from featurestore.encoders.frames import FrameResize, FramesEncoder

__all__ = [
    "DEVICE_HELP", "MODALITIES", "ENTRY_POINT_GROUP",
    "Encoder", "EncoderSpec", "AudioSegments", "FramePreprocessor",
    "create_encoder", "list_encoders", "register_encoder", "get_builder", "refresh_plugins",
    "parse_spec", "resolve_device",
    "ALLOW_DOWNLOAD_ENV", "Weights", "downloads_allowed", "file_sha256", "parse_weights", "read_state_dict",
    "seeded", "load_into", "announce_random_weights",
    "SpecError", "UnknownEncoderError", "WeightsNotFoundError", "WeightsMismatchError", "DownloadRefusedError",
    "LogMelConfig", "LogMelEncoder", "LogMelSpectrogram", "mel_filterbank",
    "TimmFrameEncoder", "ClipImageEncoder", "ClipTextEncoder", "FrameResize", "FramesEncoder",
]
