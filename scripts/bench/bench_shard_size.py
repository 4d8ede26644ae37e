"""What an extraction's shard size costs: writing, a partial commit, random reads, files (issue 23).

One store of ``--clips`` clips (default 1,000,000) holds one feature set per shard size in
``--shards`` (default 4096, 8192 and 32768 clips; ``--dim`` float16 per clip, default 512: 1 KiB),
each written as an extraction writes it: ``write_rows`` of one whole shard at a time, every clip
done. Then, per set, in one process and interleaved per repeat:

* ``write``: seconds to write the whole set shard by shard (MB/s);
* ``commit``: one partial commit, what ``extract``'s periodic commit (every ``commit_seconds``,
  default 60 s) costs per feature set: extraction's writer committing a shard half done, a quarter
  of it committed the time before (the shard file is replaced whole: a kill never tears it);
* ``get_many``: 1,024 random ids from a freshly opened store (its shards mapped on first use);
* the shard files, and the memory one lane holds per feature set (one shard being filled).

Ratios are to the first size in ``--shards``. Run:
  .venv/bin/python scripts/bench/bench_shard_size.py [--clips 1000000] [--shards 4096,8192,32768]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from featurestore import ClipRecord, Manifest, create_store, open_store
from featurestore.extract.pipeline import _Chunk, _Writer

PROVENANCE = {"encoder": "bench/random-normal", "config": {}, "weights": {"kind": "random", "seed": 0},
              "segments": {"frames": 1}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/avscene-bench-shard-size")
    p.add_argument("--clips", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--shards", default="4096,8192,32768", help="clips per shard, comma-separated")
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args(argv)


def name_of(shard: int) -> str:
    return f"emb/s{shard}"


def write_set(store, shard: int, n: int, dim: int) -> float:
    """Create the set and write it shard by shard, as extraction's writer does; returns seconds."""
    store.create_feature_set(name_of(shard), 1, (dim,), PROVENANCE, chunk_clips=shard, overwrite=True)
    rng = np.random.default_rng(shard)
    block = rng.standard_normal((shard, 1, dim)).astype(np.float16)
    t = time.perf_counter()
    for start in range(0, n, shard):
        store.write_rows(name_of(shard), start, block[:min(shard, n - start)])
    return time.perf_counter() - t


def commit_once(store, shard: int, dim: int) -> float:
    """A partial commit of the set's first shard as extraction's writer makes it (``_Writer._write``
    of a chunk's snapshot): its first quarter committed before, its second quarter encoded since."""
    name = name_of(shard)
    data = np.ones((shard, 1, dim), np.float16)
    store.write_rows(name, 0, data, done=np.zeros(shard, dtype=bool))  # the shard being filled anew
    writer = _Writer(store, [SimpleNamespace(name=name)])
    chunk = _Chunk(0, 0, shard, data, np.zeros(shard, dtype=bool), shard)
    chunk.ok[:shard // 4] = True
    writer._write(chunk.snapshot())  # the commit before (a minute earlier)
    chunk.ok[:shard // 2] = True
    t = time.perf_counter()
    writer._write(chunk.snapshot())
    return time.perf_counter() - t


def random_reads(path: Path, shard: int, ids: list[str]) -> float:
    with open_store(path, "r") as store:
        store.rows(ids)  # the id lookup is the same for every set: not what is compared
        t = time.perf_counter()
        store.get_many(name_of(shard), ids)
        return time.perf_counter() - t


def files_of(path: Path, shard: int) -> tuple[int, int]:
    folder = path / "features" / "emb" / f"s{shard}" / "data"
    files = list(folder.glob("c.*")) + list((folder / "c").rglob("*"))  # keys c.<i>.0.0, or c/<i>/0/0 (older)
    sizes = [f.stat().st_size for f in files if f.is_file() and not f.name.endswith(".partial")]
    return len(sizes), max(sizes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shards = [int(s) for s in args.shards.split(",")]
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    path = work / "store.zarr"
    ids = [f"c{i:08d}" for i in range(args.clips)]
    t = time.perf_counter()
    with create_store(path, Manifest("bench", ["a"], [ClipRecord(c, label="a") for c in ids])) as store:
        print(f"{args.clips} clips indexed in {time.perf_counter() - t:.1f} s; load {os.getloadavg()[0]:.2f}")
        writes = {s: [] for s in shards}
        commits = {s: [] for s in shards}
        for _ in range(args.repeats):
            for s in shards:
                writes[s].append(write_set(store, s, args.clips, args.dim))
                commits[s].append(commit_once(store, s, args.dim))
                store.write_rows(name_of(s), 0, np.ones((s, 1, args.dim), np.float16))  # all done again
    rng = np.random.default_rng(0)
    reads = {s: [] for s in shards}
    for _ in range(args.repeats):
        asked = [ids[i] for i in rng.choice(args.clips, 1024, replace=False)]
        for s in shards:
            reads[s].append(random_reads(path, s, asked))
    mb = args.clips * args.dim * 2 / 1e6
    base = shards[0]
    print(f"{'shard clips':>11} {'shard MiB':>9} {'files':>6} {'write (best)':>14} {'MB/s':>6} {'x':>5} "
          f"{'commit':>9} {'x':>5} {'get_many 1,024':>15} {'x':>5}")
    for s in shards:
        n_files, biggest = files_of(path, s)
        w, c, r = min(writes[s]), min(commits[s]), min(reads[s])
        print(f"{s:>11} {biggest / 2**20:>9.1f} {n_files:>6} {w:>12.2f} s {mb / w:>6.0f} {w / min(writes[base]):>5.2f} "
              f"{c * 1e3:>7.1f} ms {c / min(commits[base]):>5.2f} {r * 1e3:>12.1f} ms {r / min(reads[base]):>5.2f}")
    print(f"load {os.getloadavg()[0]:.2f} (1 min); best of {args.repeats}; one lane holds one shard being filled "
          f"per feature set (the shard MiB above), plus queued copies")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
