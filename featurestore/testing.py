"""Checks for people who write encoders: ``check_encoder(spec)`` runs the encoder contract.

The extraction pipeline relies on a few promises every encoder makes: its preprocessor turns raw
decoded input (audio segments, video frames or prompts) into a batch and pickles (it runs in
DataLoader worker processes), ``encode`` returns float32 ``[batch, *output_shape]`` that fits the
storage dtype, the same input gives the same output, an item's output does not depend on the rest
of its batch, and the provenance is plain JSON. A plugin that breaks one of these fails during a
long extraction, or worse, stores features that differ by batch. This module lets its author find
out in a second, with the same checks the library's own encoders pass::

    from featurestore.testing import check_encoder
    check_encoder("myenc/small@none")          # raises EncoderContractError listing what failed
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from featurestore.errors import FeatureStoreError

_BATCH = 3


class EncoderContractError(FeatureStoreError, AssertionError):
    """An encoder breaks the contract the extraction relies on; the message lists every failure."""


@dataclass
class ContractReport:
    """What ``check_encoder`` found: the encoder's spec, the checks run and the failures."""

    spec: str
    checked: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def smoke_input(encoder: Any, n: int = _BATCH, seed: int = 0) -> Any:
    """Raw input of the encoder's modality, as decoding would give it: seeded, deterministic.

    Audio: ``n`` mono segments of ``sample_rate * segment_seconds`` samples (a tone plus noise).
    Video: ``n`` smooth uint8 RGB frames ``[n, 48, 64, 3]``. Text: ``n`` prompts.
    """
    rng = np.random.default_rng(seed)
    if encoder.modality == "audio":
        samples = int(round(encoder.sample_rate * encoder.segment_seconds))
        t = np.arange(samples) / encoder.sample_rate
        tones = np.stack([0.3 * np.sin(2 * np.pi * (220 + 110 * i) * t) for i in range(n)])
        return (tones + 0.01 * rng.standard_normal(tones.shape)).astype(np.float32)
    if encoder.modality == "video":
        yy, xx = np.mgrid[0:48, 0:64].astype(np.float64)
        frames = [np.stack([128 + 100 * np.sin(xx / rng.uniform(8, 30) + i), 128 + 100 * np.cos(yy / 12.0),
                            128 + 60 * np.sin((xx + yy) / 25.0 + i)], axis=-1) for i in range(n)]
        return np.clip(np.stack(frames), 0, 255).astype(np.uint8)
    return [f"a photo of scene number {i}." for i in range(n)]


def check_encoder(spec: Any, raise_on_failure: bool = True, atol: float = 1e-4, **options: Any) -> ContractReport:
    """Build ``spec`` (a spec string, or an already built ``Encoder``) and run the encoder contract.

    Args:
        spec: what ``featurestore.encoders.create_encoder`` takes (``"myenc/model@none"``), or an
            ``Encoder`` instance.
        raise_on_failure: raise ``EncoderContractError`` listing every failure (default); else
            return the report.
        atol: tolerance of the determinism and batch-independence checks (float32 kernels may
            differ in the last bits between batch sizes).
        **options: passed to ``create_encoder``.
    """
    import torch

    from featurestore.encoders import Encoder, create_encoder, parse_spec
    from featurestore.provenance import canonical_json, fingerprint

    encoder = spec if isinstance(spec, Encoder) else create_encoder(spec, **options)
    report = ContractReport(str(encoder.spec))

    def check(name: str, ok: bool, why: str) -> bool:
        report.checked.append(name)
        if not ok:
            report.failures.append(f"{name}: {why}")
        return ok

    check("modality", encoder.modality in ("audio", "video", "text"),
          f"modality is {encoder.modality!r}, expected 'audio', 'video' or 'text'")
    check("spec", parse_spec(encoder.spec).name == encoder.name,
          f"spec {encoder.spec!r} does not name the encoder {encoder.name!r}")
    raw = smoke_input(encoder)
    pre = encoder.preprocessor()
    batch = pre(raw)
    try:
        again = pickle.loads(pickle.dumps(pre))(raw)
        check("preprocessor pickles", torch.equal(batch, again),
              "a pickled copy of the preprocessor gives another batch (workers would see other input)")
    except Exception as err:  # noqa: BLE001 - reported as a failure
        check("preprocessor pickles", False, f"pickling failed ({type(err).__name__}: {err}); DataLoader "
                                             f"worker processes need it")
    before = batch.clone() if isinstance(batch, torch.Tensor) else None
    try:
        out = encoder.encode(batch)
    except Exception as err:  # noqa: BLE001 - reported as a failure
        check("encode", False, f"raised {type(err).__name__}: {err}")
        return _finish(report, raise_on_failure)
    if before is not None:  # encoders with an equal preprocessor share one batch: extraction refuses the run
        check("input unchanged", torch.equal(batch, before),
              "encode changed its input batch in place (normalise into a new tensor: x = x - mean)")
    shape_ok = check("output shape", tuple(out.shape) == (len(raw), *encoder.output_shape),
                     f"encode gave {tuple(out.shape)}, output_shape promises {(len(raw), *encoder.output_shape)}")
    check("output dtype", out.dtype == torch.float32, f"encode gave {out.dtype}, expected torch.float32")
    values = out.detach().float().cpu().numpy()
    check("finite", bool(np.isfinite(values).all()), "encode gave NaN or Inf")
    check("fits storage dtype", _storable(values, encoder.dtype),
          f"values overflow the storage dtype {encoder.dtype}")
    repeat = encoder.encode(pre(raw)).detach().float().cpu().numpy()
    check("deterministic", repeat.shape == values.shape and np.allclose(repeat, values, atol=atol),
          "the same input gave different outputs (dropout left on, or unseeded randomness?)")
    if shape_ok:
        alone = encoder.encode(pre(raw[:1])).detach().float().cpu().numpy()
        check("batch independent", np.allclose(alone[0], values[0], atol=atol),
              "an item's output depends on the other items of its batch (BatchNorm in training mode?)")
    prov = encoder.provenance()
    check("provenance keys", isinstance(prov, dict) and {"encoder", "config", "weights"} <= set(prov),
          f"provenance must hold 'encoder', 'config' and 'weights', has {sorted(prov) if isinstance(prov, dict) else prov!r}")
    try:
        plain = json.loads(canonical_json(prov)) == json.loads(json.dumps(prov))
        check("provenance is JSON", plain, "provenance holds values that do not survive JSON")
        fingerprint(prov)
    except (TypeError, ValueError) as err:
        check("provenance is JSON", False, f"{type(err).__name__}: {err}")
    return _finish(report, raise_on_failure)


def _storable(values: np.ndarray, dtype: str) -> bool:
    """Whether extraction would store every value: finite after the cast, and for an integer dtype
    within its range before it (numpy's cast would wrap 300 to 44 in uint8; extraction refuses)."""
    kind = np.dtype(dtype)
    if not np.issubdtype(kind, np.integer):
        with np.errstate(over="ignore"):
            return bool(np.isfinite(values.astype(kind)).all())
    info = np.iinfo(kind)
    return bool((np.isfinite(values) & (values > info.min - 1) & (values < info.max + 1)).all())


def _finish(report: ContractReport, raise_on_failure: bool) -> ContractReport:
    if report.failures and raise_on_failure:
        raise EncoderContractError(f"encoder {report.spec!r} breaks the contract: " + "; ".join(report.failures))
    return report


def per_frame_preprocessing(pre: Any, frames: np.ndarray) -> Any:
    """The frame preprocessing extraction ran before issue 21, kept frozen as the reference that
    ``FramePreprocessor.batched`` must equal bit for bit on the CPU (stored features and their
    fingerprints promise it): one frame at a time, float32 resize, centre crop, normalise.

    Args:
        pre: a ``FramePreprocessor``.
        frames: ``uint8 [K, H, W, 3]`` RGB frames.

    Returns:
        ``float32 [K, 3, h, w]``.
    """
    import torch
    import torch.nn.functional as F

    mean = torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1)
    out = torch.empty((frames.shape[0], 3, *pre.crop), dtype=torch.float32)
    for i, frame in enumerate(frames):
        x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).unsqueeze(0).float()
        size = pre.resized_size(x.shape[-2], x.shape[-1])
        if size != tuple(x.shape[-2:]):
            if pre.interpolation == "nearest":
                x = F.interpolate(x, size=size, mode="nearest")
            else:
                x = F.interpolate(x, size=size, mode=pre.interpolation, align_corners=False, antialias=True)
                x = x.clamp_(0.0, 255.0).round_()
        height, width = x.shape[-2:]
        top, left = int(round((height - pre.crop[0]) / 2.0)), int(round((width - pre.crop[1]) / 2.0))
        x = x[..., top:top + pre.crop[0], left:left + pre.crop[1]]
        out[i] = ((x / 255.0 - mean) / std)[0]
    return out
