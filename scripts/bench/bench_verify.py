"""Benchmark ``store.verify()`` against checksumming the same chunk files directly, in one process.

The store is built through the public API: ``--clips`` clips (default 200,000) x ``--segments`` x
``--dim`` float16 (default 1 x 512: ~205 MB of feature data), every clip done, uncompressed (the
default for embeddings), in ``--workdir`` (reused when it exists with the same parameters).

Compared, over the same bytes (every chunk file under the store directory, index included):
  * ``verify``: ``verify_store(store, threads)`` (what ``store.verify()`` runs), the whole check:
    checksums of every chunk, done-vs-data, finiteness of done rows, index checks;
  * the reference the issue names: read each chunk file's bytes, crc32c of the chunk
    (``google_crc32c``, the implementation zarr's ``crc32c`` codec uses) and ``np.isfinite`` over
    the float values of the feature data. A file of a sharded array (Zarr v3 ``sharding_indexed``,
    the layout feature sets are written in, docs/store.md) is a shard: the reference checks its
    index's crc32c, then each inner chunk's crc32c and ``np.isfinite`` over its values (decoded
    first when zstd-compressed); a plain chunk file is one checksum over the whole file.

Throughput is total chunk bytes / wall time; verify's time starts on an open store (opening is
printed beside it) and includes re-reading the index, since verify starts with ``store.refresh()``.
The two are interleaved per repeat (so load from other processes hits both alike) and the best of
``--repeats`` is compared. The OS page cache is warm for both: this compares CPU work, not the disk.
Context lines: verify on one thread, and the reference testing float16 finiteness on the exponent
bits as verify does.

Floor from issue 23: verify >= 50% of the reference's throughput.

Run:  .venv/bin/python scripts/bench/bench_verify.py [--clips 200000] [--threads N] [--workdir DIR]
      [--chunk-clips 8: the plain layout, one chunk file per 8 clips]
Exit code 1 when the floor is missed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np

from featurestore import TAU_CLASSES, ClipRecord, Manifest, create_store, open_store
from featurestore.store.verify import DEFAULT_THREADS, verify_store

FEATURE = "clip/bench"
PROVENANCE = {"encoder": "bench/random-normal", "config": {}, "weights": {"kind": "random", "seed": 0},
              "segments": {"frames": 1}}
FLOOR = 0.5
_CRC = 4  # bytes of a crc32c
_ABSENT = 2**64 - 1  # a shard index's offset of an absent inner chunk


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/avscene-bench-verify", help="where the store is built once")
    p.add_argument("--clips", type=int, default=200_000)
    p.add_argument("--segments", type=int, default=1)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help=f"verify's threads (default: its own, {DEFAULT_THREADS} here)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-clips", type=int, default=None,
                   help="clips per chunk (a shard) of the feature set (default: the store's own); one "
                        "small enough to be a single inner chunk gives the plain, unsharded layout")
    p.add_argument("--rebuild", action="store_true")
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> Path:
    """The store, built once through the public API; a marker file records what was built."""
    spec = {"clips": args.clips, "segments": args.segments, "dim": args.dim, "seed": args.seed,
            "chunk_clips": args.chunk_clips}
    work = Path(args.workdir) / f"{args.clips}x{args.segments}x{args.dim}x{args.chunk_clips or 'default'}"
    store_path, marker = work / "store.zarr", work / "built.json"
    if not args.rebuild and marker.exists() and json.loads(marker.read_text()) == spec:
        return store_path
    work.mkdir(parents=True, exist_ok=True)
    ids = [f"{TAU_CLASSES[i % 10]}-city{i % 12}-{i % 97}-{i}-a" for i in range(args.clips)]
    manifest = Manifest("bench", list(TAU_CLASSES),
                        [ClipRecord(c, label=TAU_CLASSES[i % 10], splits=frozenset({"all"}))
                         for i, c in enumerate(ids)])
    rng = np.random.default_rng(args.seed)
    with create_store(store_path, manifest) as store:
        info = store.create_feature_set(FEATURE, args.segments, (args.dim,), PROVENANCE,
                                        chunk_clips=args.chunk_clips)
        block = info.chunk_clips * 8
        for start in range(0, args.clips, block):
            n = min(block, args.clips - start)
            store.write_rows(FEATURE, start, rng.standard_normal((n, args.segments, args.dim), np.float32)
                             .astype(np.float16))
    marker.write_text(json.dumps(spec))
    return store_path


@dataclass(frozen=True)
class ChunkFile:
    """One chunk file of the store: a plain chunk (its bytes, then their crc32c) or a Zarr v3 shard
    (inner chunks, each its bytes then their crc32c, then an index sealed by its own crc32c)."""

    path: Path
    is_float: bool  # holds float16 feature values (finiteness is checked)
    index_bytes: int = 0  # a shard's index, its crc32c included; 0: a plain chunk
    zstd: bool = False  # a shard's inner chunks are zstd-compressed (decoded before isfinite)


def chunk_files(store_path: Path) -> list[ChunkFile]:
    """Every chunk file of the store, with what the reference needs to check it."""
    out = []
    for meta in sorted(store_path.rglob("zarr.json")):
        node = json.loads(meta.read_text())
        if node.get("node_type") != "array":
            continue
        is_float, index_bytes, zstd = node.get("data_type") == "float16", 0, False
        codecs = node.get("codecs", [])
        if codecs and codecs[0]["name"] == "sharding_indexed":
            config = codecs[0]["configuration"]
            if config.get("index_location", "end") != "end":
                raise ValueError(f"{meta}: shard index at the start; the reference reads it at the end")
            shard_shape = node["chunk_grid"]["configuration"]["chunk_shape"]
            per_shard = int(np.prod([s // i for s, i in zip(shard_shape, config["chunk_shape"])]))
            index_bytes = per_shard * 16 + _CRC
            zstd = any(c["name"] == "zstd" for c in config["codecs"])
        sep = node.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/")
        files = (meta.parent / "c").rglob("*") if sep == "/" else meta.parent.glob("c.*")
        out += [ChunkFile(f, is_float, index_bytes, zstd)
                for f in sorted(files) if f.is_file() and not f.name.endswith(".partial")]
    return out


def _crc_ok(body: np.ndarray) -> bool:
    """Whether ``body``'s last 4 bytes are the crc32c of the rest."""
    return np.uint32(google_crc32c.value(body[:-_CRC])).tobytes() == body[-_CRC:].tobytes()


def _finite(values: np.ndarray, exponent_bits: bool) -> bool:
    """Whether float16 values (as bytes) are all finite: ``np.isfinite``, or the exponent bits."""
    if exponent_bits:
        return not ((values.view(np.uint16) & 0x7C00) == 0x7C00).any()
    return bool(np.isfinite(values.view(np.float16)).all())


def _shard_bad(raw: np.ndarray, chunk: ChunkFile, exponent_bits: bool) -> int:
    """Bad inner chunks of one shard (a failed index counts as one): crc32c of the index and of each
    inner chunk, finiteness of float values. Uniform shards (every inner chunk the same length, back
    to back: what the store writes) get one finiteness test over all their values, then one per
    inner chunk only when that fails (to count them)."""
    tail = raw[-chunk.index_bytes:]
    if len(raw) < chunk.index_bytes or not _crc_ok(tail):
        return 1
    index = tail[:-_CRC].view("<u8").reshape(-1, 2)
    spans = index[index[:, 0] != _ABSENT].astype(np.int64)
    bodies = [raw[lo:lo + n] for lo, n in spans.tolist()]
    bad = sum(not _crc_ok(b) for b in bodies)
    if not chunk.is_float or bad:
        return bad
    if chunk.zstd:
        zstd = numcodecs.Zstd()
        return sum(not _finite(np.frombuffer(zstd.decode(b[:-_CRC]), np.uint8), exponent_bits) for b in bodies)
    length = int(spans[0, 1]) if len(spans) else 0
    uniform = len(spans) and (spans[:, 1] == length).all() and \
        (spans[:, 0] == np.arange(len(spans)) * length).all()
    if uniform and _finite(raw[:len(spans) * length].reshape(-1, length)[:, :-_CRC], exponent_bits):
        return 0
    return sum(not _finite(b[:-_CRC], exponent_bits) for b in bodies)


def reference(files: list[ChunkFile], exponent_bits: bool = False) -> int:
    """Read every chunk file, crc32c each chunk (each inner chunk of a shard, and the shard's index),
    isfinite over its float values; returns the bad chunks.

    ``exponent_bits``: test finiteness on float16's exponent bits as verify does (context only:
    the floor is judged against ``np.isfinite``, the reference the issue names)."""
    bad = 0
    for chunk in files:
        raw = np.fromfile(chunk.path, dtype=np.uint8)
        if chunk.index_bytes:
            bad += _shard_bad(raw, chunk, exponent_bits)
        elif not _crc_ok(raw):
            bad += 1
        elif chunk.is_float and not _finite(raw[:-_CRC], exponent_bits):
            bad += 1
    return bad


def run_verify(store_path: Path, threads: int | None) -> tuple[object, float, float]:
    """verify's report, seconds to open the store, seconds of verify itself (which re-reads the
    index: it starts with ``store.refresh()``)."""
    t0 = time.perf_counter()
    with open_store(store_path, "r") as store:
        t1 = time.perf_counter()
        report = verify_store(store, threads=threads)
        return report, t1 - t0, time.perf_counter() - t1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    store_path = build(args)
    files = chunk_files(store_path)
    total = sum(f.path.stat().st_size for f in files)
    print(f"store {store_path}: {len(files)} chunk files ({sum(bool(f.index_bytes) for f in files)} of them "
          f"shards), {total / 1e6:.1f} MB "
          f"(ready in {time.perf_counter() - t0:.1f} s); load {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
    reference(files), run_verify(store_path, args.threads)  # warm the page cache and imports
    ours, ref, opens, one_thread, bits = [], [], [], [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        bad = reference(files)
        ref.append(time.perf_counter() - t)
        report, opened, verified = run_verify(store_path, args.threads)
        ours.append(verified)
        opens.append(opened)
        one_thread.append(run_verify(store_path, 1)[2])
        t = time.perf_counter()
        bad += reference(files, exponent_bits=True)
        bits.append(time.perf_counter() - t)
        if bad or not report.ok:
            print(f"the benchmark store is damaged: reference {bad} bad chunk(s); {report.summary()}")
            return 1
    best_ours, best_ref = min(ours), min(ref)
    ratio = best_ref / best_ours
    print(f"verify:    {total / best_ours / 1e6:8.1f} MB/s  best {best_ours * 1e3:8.1f} ms "
          f"(all: {', '.join(f'{t * 1e3:.0f}' for t in ours)}); {report.chunks_read} chunks read; "
          f"threads {args.threads or DEFAULT_THREADS}; opening the store before it: best {min(opens) * 1e3:.0f} ms")
    print(f"reference: {total / best_ref / 1e6:8.1f} MB/s  best {best_ref * 1e3:8.1f} ms "
          f"(all: {', '.join(f'{t * 1e3:.0f}' for t in ref)}) crc32c + isfinite over the same files")
    print(f"context:   verify on 1 thread {total / min(one_thread) / 1e6:.1f} MB/s; reference testing float16 "
          f"exponent bits instead of np.isfinite (as verify does) {total / min(bits) / 1e6:.1f} MB/s")
    print(f"ratio verify/reference throughput: {ratio:.2f} (floor {FLOOR}); load {os.getloadavg()[0]:.2f}")
    return 0 if ratio >= FLOOR else 1


if __name__ == "__main__":
    sys.exit(main())
