"""CRC32C of many equal-sized blocks, computed while other threads run.

A shard's inner chunks each carry a crc32c (Zarr's ``crc32c`` codec): a million 1 KiB clips in
8-clip chunks are 125,000 checksums per fill, ~0.2 s of one core. ``google_crc32c.value`` holds the
GIL while it runs, so a writer cannot checksum the next shard while it writes this one. This module
calls the same C function (``crc32c_value`` of the libcrc32c that google-crc32c links, the library
zarr's codec uses) through ``ctypes``, which releases the GIL for each call: the checksums of one
shard then run on another core while the shard before it is copied into the page cache.

Where that library cannot be reached (google-crc32c's pure-Python build), ``RELEASES_GIL`` is False
and the checksums are computed as before, by ``google_crc32c.value``.
"""
from __future__ import annotations

import ctypes
from itertools import repeat

import google_crc32c
import numpy as np

CRC_BYTES = 4
_CHECK = (b"123456789", 0xE3069283)  # the CRC-32C check value (RFC 3720, B.4)


def _c_crc32c():
    """``crc32c_value(const uint8_t*, size_t)`` of google-crc32c's C library, or None."""
    try:
        from google_crc32c import _crc32c  # the C extension; absent in the pure-Python build
        fn = ctypes.CDLL(_crc32c.__file__).crc32c_value  # dlsym searches the extension's libcrc32c too
    except (ImportError, OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_uint32, (ctypes.c_void_p, ctypes.c_size_t)
    data, expected = _CHECK
    buf = ctypes.create_string_buffer(data, len(data))
    return fn if fn(ctypes.addressof(buf), len(data)) == expected else None


_VALUE = _c_crc32c()
#: whether ``block_crcs`` lets other threads run while it checksums
RELEASES_GIL = _VALUE is not None


def block_crcs(raw: np.ndarray) -> np.ndarray:
    """``[n, 4]`` uint8: the crc32c of each row of ``raw`` (``[n, bytes]`` uint8), little-endian, as
    zarr stores it after each chunk."""
    if raw.dtype != np.uint8 or raw.ndim != 2:
        raise TypeError(f"block_crcs takes [n, bytes] uint8, not {raw.dtype} of shape {raw.shape}")
    raw = np.ascontiguousarray(raw)
    n, size = raw.shape
    if _VALUE is None or not n or not size:
        sums = np.fromiter(map(google_crc32c.value, raw), dtype="<u4", count=n)
    else:  # the rows' addresses inside ``raw``, which stays alive (and unchanged) through the calls
        first = raw.ctypes.data
        sums = np.fromiter(map(_VALUE, range(first, first + n * size, size), repeat(size, n)), dtype="<u4", count=n)
    return sums.view(np.uint8).reshape(n, CRC_BYTES)
