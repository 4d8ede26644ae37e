"""What crosses between the host and the encoders' device, without making the host wait (issue 21 item 4).

An accelerator is only kept busy when the host never waits for it inside the encode loop: every
wait (a blocking copy, ``.item()``, ``.cpu()``) empties the device's queue. So:

* **one device copy per decoded tensor**: encoders that read the same decoded tensor (the uint8
  frames every image encoder shares, e.g. RN101 and ViT-B/32) share one copy of it
  (``DeviceCopies``); a copy is issued when the decoded batch arrives (``prefetch``), on a
  separate copy stream on CUDA, so it overlaps the encoding of the batch before;
* **results come back without waiting**: ``launch`` casts on the device, judges finiteness there,
  and starts non-blocking copies of both into pinned host memory, marked by an event; the lane
  takes them ``INFLIGHT_BATCHES`` encode batches later (``_Launched.result``), by when the device
  has long finished them, so the device always has the next batches queued;
* **parameter-free encoders run on the host** (``Encoder.runs_on_host``: ``frames/...``, whose
  "encoding" is a dtype change): sending their bytes to the device and back would cost two copies
  for nothing (``lane_device``).

On the CPU nothing here changes what is computed: the lane keeps its synchronous path there.
Tests count the device copies and host syncs of the encode lane on fake CUDA tensors
(``FakeTensorMode``), so these properties are checked without a GPU.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from featurestore.testing import EncoderContractError

#: Encode batches a lane keeps in flight on the device before it takes the oldest one's outputs.
INFLIGHT_BATCHES = 2
_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def lane_device(target: Any, device: torch.device) -> torch.device:
    """Where ``target``'s encoder runs: the host for parameter-free encoders, else ``device``."""
    encoder = target.encoder
    if device.type != "cpu" and getattr(encoder, "runs_on_host", False):
        encoder.device = torch.device("cpu")
        return torch.device("cpu")
    return device


def _cuda_streams(device: torch.device) -> bool:
    """Whether real CUDA streams and events can be used (not on the CPU, nor on fake CUDA tensors)."""
    return device.type == "cuda" and torch.cuda.is_available()


class DeviceCopies:
    """One device copy of each decoded tensor, shared by every lane that reads it.

    Keyed by the host tensor (held, so its id stays valid) until no lane has rows of it pending
    (``keep``). On CUDA the copies run on their own stream and the encoding stream waits for each
    one's event only when it first reads it.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._copies: dict[int, tuple[torch.Tensor, torch.Tensor, Any]] = {}  # id -> (host, device, event)
        self._stream = torch.cuda.Stream(device) if _cuda_streams(device) else None

    def prefetch(self, x: torch.Tensor) -> None:
        """Start copying ``x`` to the device (once)."""
        if self.device.type == "cpu" or id(x) in self._copies:
            return
        if self._stream is None:
            self._copies[id(x)] = (x, x.to(self.device, non_blocking=True), None)
            return
        with torch.cuda.stream(self._stream):
            y = x.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._copies[id(x)] = (x, y, event)

    def get(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the device: its one copy (started now if it was not prefetched)."""
        if self.device.type == "cpu":
            return x
        self.prefetch(x)
        host, y, event = self._copies[id(x)]
        if event is not None:  # the encoding stream waits for the copy, the host does not
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            y.record_stream(stream)
            self._copies[id(x)] = (host, y, None)
        return y

    def stack(self, parts: list[tuple[torch.Tensor, int]], n_seg: int) -> torch.Tensor:
        """Rows ``(decoded tensor, index in it)`` as one tensor on the device: a slice of the one
        copy when they are consecutive in one tensor (the usual case), else cut from the copies."""
        first, i0 = parts[0]
        if all(t is first and i == i0 + k for k, (t, i) in enumerate(parts)):
            return self.get(first)[i0 * n_seg:(i0 + len(parts)) * n_seg]
        return torch.cat([self.get(t)[i * n_seg:(i + 1) * n_seg] for t, i in parts])

    def keep(self, ids: set[int]) -> None:
        """Forget the copies of tensors whose ids are not in ``ids`` (no lane needs them now)."""
        for key in [k for k in self._copies if k not in ids]:
            del self._copies[key]


class _Launched:
    """An encode batch's outputs on their way to the host: pinned buffers and the event after them."""

    def __init__(self, out: torch.Tensor, finite: torch.Tensor | None, event: Any, dtype: str):
        self.out, self.finite, self.event, self.dtype = out, finite, event, dtype

    def result(self, target: Any, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """The outputs as stored and the finite flag per row (waits for this batch's copies only)."""
        if self.event is not None:
            self.event.synchronize()
        if self.finite is None:  # a dtype torch lacks: cast on the host, judged as cast
            return cast_on_host(self.out.numpy(), self.dtype, n_rows)
        return self.out.numpy(), self.finite.numpy()


def cast_on_host(values: np.ndarray, dtype: str, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 outputs (``n_rows`` rows, first axis) in a stored dtype torch lacks, and whether each
    row is storable: all finite after the cast, and for an integer dtype (``frames/...``'s uint8, a
    quantising plugin's) every value within its range before it. numpy's cast would turn NaN into 0
    and wrap 300 to 44 in uint8, silently, and the row would be marked done."""
    kind = np.dtype(dtype)
    if not np.issubdtype(kind, np.integer):
        stored = values.astype(kind)
        return stored, np.isfinite(stored.reshape(n_rows, -1)).all(axis=1)
    info = np.iinfo(kind)
    with np.errstate(invalid="ignore"):  # the cast truncates toward zero: -0.5 and 255.5 still fit uint8
        fits = np.isfinite(values) & (values > info.min - 1) & (values < info.max + 1)
    return np.where(fits, values, 0).astype(kind), fits.reshape(n_rows, -1).all(axis=1)


def encode_unchanged(target: Any, x: torch.Tensor) -> torch.Tensor:
    """``target.encoder.encode(x)``, refusing an encoder that changed ``x`` in place or returned
    another number of rows (or another shape) than its input has segments and it promises.

    ``x`` is (a view of) the one decoded tensor, or its one device copy, that every encoder with an
    equal preprocessor reads: an encoder that normalised it in place (``batch.sub_(mean)``) would
    make every encoder after it store features of the altered input, silently. Torch counts in-place
    writes on a tensor and its views (``_version``), so the check costs nothing; it raises before any
    other encoder reads the batch, so no wrong row is written.
    """
    version = x._version
    out = target.encoder.encode(x)
    if x._version != version:
        raise EncoderContractError(
            f"encoder {target.encoder.spec} (feature set {target.name}) changed its input batch in place; "
            f"encoders share decoded inputs, so the others would store features of the changed input: "
            f"the encoder must leave its input unchanged (e.g. batch = batch - mean, not batch.sub_(mean))")
    expected = (x.shape[0], *target.shape)
    if tuple(out.shape) != expected:  # an encoder that overrides encode() skips the base class's check
        raise EncoderContractError(
            f"encoder {target.encoder.spec} (feature set {target.name}) returned shape {tuple(out.shape)} for a "
            f"batch of {x.shape[0]} inputs; expected {expected} (one output per segment or frame, in order)")
    return out


def preprocess_unchanged(target: Any, batched: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``batched(x)``: the device half of an image encoder's preprocessing, refusing one that changed
    ``x`` in place. ``x`` is (a slice of) the one device copy of the decoded uint8 frames that every
    image encoder of the source reads, so an in-place step would alter the frames of the encoders
    after it (see ``encode_unchanged``: the same ``_version`` check, free)."""
    version = x._version
    out = batched(x)
    if x._version != version:
        raise EncoderContractError(
            f"the preprocessor of encoder {target.encoder.spec} (feature set {target.name}) changed the decoded "
            f"frames in place in its batched step; encoders share decoded frames, so the others would store "
            f"features of the changed frames: the step must leave its input unchanged (x = x.float() / 255, "
            f"not x.div_(255))")
    return out


def launch(target: Any, x: torch.Tensor, n_rows: int) -> _Launched:
    """Encode ``x`` on the device and start bringing the stored-dtype outputs and per-row finite
    flags back into pinned memory, without waiting for any of it."""
    out = encode_unchanged(target, x)
    dtype = _TORCH_DTYPES.get(target.dtype)
    cast = out.to(dtype if dtype is not None else torch.float32)
    finite = torch.isfinite(cast.reshape(n_rows, -1)).all(dim=1) if dtype is not None else None
    pin = _cuda_streams(cast.device)
    host = torch.empty(cast.shape, dtype=cast.dtype, pin_memory=pin)
    host.copy_(cast, non_blocking=True)
    flags = None
    if finite is not None:
        flags = torch.empty(finite.shape, dtype=torch.bool, pin_memory=pin)
        flags.copy_(finite, non_blocking=True)
    event = None
    if pin:
        event = torch.cuda.Event()
        event.record()
    return _Launched(host, flags, event, target.dtype)
