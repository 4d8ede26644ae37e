"""Shared-memory buffers that decode workers reuse for the batches they hand over (issue 21 item 1).

A decode worker hands each decode batch's stacked tensors (uint8 frames, ``H x W x 3`` bytes per
frame) to the main process through shared memory. Fresh shared memory for every batch costs a page
fault and a zeroed page per 4 KiB on both sides, which on a loaded machine was most of the worker's
hand-over (a 720p frame is 2.76 MB). So each worker owns a few *slots*: a shared buffer it allocates
once (grown when a batch needs more) and stacks every later batch into. The main process maps a
slot's buffer once too: torch's storage cache finds the same buffer when it arrives again, as long
as the main process still holds it, which the pool makes sure of.

A slot is busy from the moment a worker stacks into it until the main process has let go of every
tensor of it (``weakref.finalize`` on the received tensor: when the encode lanes have taken their
rows, or the pin-memory thread has copied them into pinned memory on CUDA); only then may the worker
write it again. The busy flags are one shared ``uint8`` tensor made before the workers start; each
flag has one writer at a time (the worker sets it, the main process clears it), so no lock is
needed. A worker whose slots are all busy falls back to fresh shared memory for that batch, so the
pool never makes a worker wait.
"""
from __future__ import annotations

import itertools
import math
import os
import weakref

import torch

#: Slots per decode worker: its prefetched batches, one being encoded and one spare.
SLOTS_PER_WORKER = 4
#: Environment variable overriding ``SLOTS_PER_WORKER``; ``0`` turns the pool off (every batch in
#: fresh shared memory, as before the pool: e.g. to compare, or to test running out of it).
SLOTS_ENV = "FEATURESTORE_DECODE_BUFFERS"

_POOLS: dict[int, BufferPool] = {}  # the pools of this (main) process, by key, for received batches
_KEYS = itertools.count(1)


def slots_per_worker() -> int:
    """``SLOTS_PER_WORKER``, or the number in ``SLOTS_ENV`` (a bad value is refused in one line)."""
    value = os.environ.get(SLOTS_ENV, "").strip()
    if not value:
        return SLOTS_PER_WORKER
    if not value.isdigit():
        raise ValueError(f"{SLOTS_ENV}={value!r}: expected a whole number of buffers per decode worker (0: none)")
    return int(value)


class BufferPool:
    """Reused shared-memory buffers, ``slots_per_worker`` per decode worker (see the module doc).

    Args:
        num_workers: decode worker processes (worker ``w`` owns slots ``w * slots_per_worker ...``).
        slots_per_worker: buffers each worker may have in flight before it falls back to fresh ones.
    """

    def __init__(self, num_workers: int, slots_per_worker: int = SLOTS_PER_WORKER):
        self.slots_per_worker = slots_per_worker
        self.busy = torch.zeros(max(1, num_workers) * slots_per_worker, dtype=torch.uint8).share_memory_()
        self.key = next(_KEYS)
        self._own: dict[int, torch.UntypedStorage] = {}  # worker side: slot -> its buffer
        self._mapped: dict[int, torch.UntypedStorage] = {}  # main side: slot -> buffer last received
        #: Tensors the main process received in a slot (the others came in fresh shared memory).
        self.received_tensors = 0
        _POOLS[self.key] = self

    def __getstate__(self) -> dict:
        return {"slots_per_worker": self.slots_per_worker, "busy": self.busy, "key": self.key}

    def __setstate__(self, state: dict) -> None:  # a worker started by spawn: its own empty slots
        self.__dict__.update(state, _own={}, _mapped={}, received_tensors=0)

    def close(self) -> None:
        """Forget the buffers this process maps (at the end of a run)."""
        _POOLS.pop(self.key, None)
        self._mapped.clear()
        self._own.clear()

    # ----------------------------------------------------------------------------- worker side
    def stack(self, tensors: list[torch.Tensor], worker: int) -> tuple[torch.Tensor, int] | None:
        """``torch.cat(tensors)`` into a free slot of ``worker``: the tensor and its slot, or None
        when every slot of the worker is busy. Raises what shared-memory allocation raises."""
        slot = self._free_slot(worker)
        if slot is None:
            return None
        first = tensors[0]
        shape = (sum(t.shape[0] for t in tensors), *first.shape[1:])
        nbytes = math.prod(shape) * first.element_size()
        buffer = self._own.get(slot)
        if buffer is None or buffer.nbytes() < nbytes:
            buffer = torch.UntypedStorage._new_shared(max(nbytes, 1))
            self._own[slot] = buffer
        out = torch.empty(0, dtype=first.dtype).set_(buffer, 0, shape)
        torch.cat(tensors, out=out)
        self.busy[slot] = 1
        return out, slot

    def _free_slot(self, worker: int) -> int | None:
        lo = worker * self.slots_per_worker
        for slot in range(lo, lo + self.slots_per_worker):
            if not self.busy[slot]:
                return slot
        return None

    # ------------------------------------------------------------------------------- main side
    def received(self, tensor: torch.Tensor, slot: int) -> None:
        """A tensor of ``slot`` arrived: keep its buffer mapped, free the slot once it is let go."""
        self._mapped[slot] = tensor.untyped_storage()
        self.received_tensors += 1
        weakref.finalize(tensor, self.release, slot)

    def release(self, slot: int) -> None:
        """The main process is done with ``slot``: its worker may stack into it again."""
        self.busy[slot] = 0


def received(key: int, pooled: list[tuple[torch.Tensor, int]]) -> None:
    """Register a received batch's pooled tensors with the pool ``key`` of this process (none: a
    batch read in the worker itself, nothing to do)."""
    pool = _POOLS.get(key)
    if pool is None:
        return
    for tensor, slot in pooled:
        pool.received(tensor, slot)
