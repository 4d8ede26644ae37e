"""Benchmark the store at scale (issue 23): a store of N clips x 1 x 512 float16 built through the public API.

This part times the index (issue 23 item 2), each in a fresh process, after imports, page cache warm,
median of ``--repeats`` processes:

  1. open + first get: ``open_store(path)`` then ``store.get(name, id)`` of one random id; reference:
     h5py opening the same matrix and its id column, building the id -> row dict, reading the row
     (what a user without the store writes), and a numpy memmap of the matrix (no ids at all).
  2. ``ls``: ``describe_store`` (everything ``featurestore ls`` prints) after open; and the whole
     ``featurestore ls`` command as a process (imports included).
  3. ``feature_info``: done and error counts of the feature set.
  4. peak RSS of the open + first get process, against the h5py + id dict process (every probe
     imports the same modules, zarr and h5py included, before its clock starts).

``--before DIR`` times the same store with another checkout of the code too (e.g. the commit before
the persisted lookup: ``git archive <commit> featurestore | tar -x -C DIR``), so before/after are
ratios of one run. The store is built once into ``--workdir`` and reused.

Run:  .venv/bin/python scripts/bench/bench_scale.py --clips 1000000 [--before /tmp/before]
Exit code 1 when a floor is missed (open + first get <= 0.3 s; ls well under a second: <= 0.5 s).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
FEATURE = "clip/bench"
DIM = 512
PROVENANCE = {"encoder": "bench/random-normal", "config": {}, "weights": {"kind": "random", "seed": 0},
              "segments": {"frames": 1}}
CLASSES = ["airport", "bus", "metro", "metro_station", "park", "public_square", "shopping_mall",
           "street_pedestrian", "street_traffic", "tram"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/avscene-bench-scale")
    p.add_argument("--clips", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per measurement (median)")
    p.add_argument("--before", default=None, help="a directory holding another checkout's featurestore/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--lookup-sweep", type=int, nargs="*", default=None, metavar="ROWS",
                   help="only time the id lookup, its table in chunks of these many rows (1024 4096 16384)")
    return p.parse_args(argv)


def clip_id(i: int) -> str:
    return f"{CLASSES[i % 10]}-city{i % 12}-{i % 97}-{i}-a"


# ----------------------------------------------------------------------------------- the data
def build(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """The store, an h5py file (matrix + id column) and a .npy of the matrix; built once."""
    import h5py

    from featurestore import ClipRecord, Manifest, create_store

    work = Path(args.workdir) / f"clips-{args.clips}"
    store_path, h5_path, npy_path, marker = work / "store.zarr", work / "raw.h5", work / "raw.npy", work / "built.json"
    spec = {"clips": args.clips, "dim": DIM, "seed": args.seed}
    if not args.rebuild and marker.exists() and json.loads(marker.read_text()) == spec:
        return store_path, h5_path, npy_path
    work.mkdir(parents=True, exist_ok=True)
    n = args.clips
    ids = [clip_id(i) for i in range(n)]
    t = time.perf_counter()
    manifest = Manifest("bench", CLASSES, [
        ClipRecord(cid, label=CLASSES[i % 10], city=f"city{i % 12}", location=f"city{i % 12}-{i % 97}",
                   splits=frozenset({"train" if i % 4 else "test"})) for i, cid in enumerate(ids)])
    rng = np.random.default_rng(args.seed)
    mm = np.lib.format.open_memmap(npy_path, mode="w+", dtype=np.float16, shape=(n, 1, DIM))
    with create_store(store_path, manifest) as store:
        info = store.create_feature_set(FEATURE, 1, (DIM,), PROVENANCE)
        step = info.chunk_clips * max(1, 65536 // info.chunk_clips)
        for start in range(0, n, step):
            block = rng.standard_normal((min(step, n - start), 1, DIM), dtype=np.float32).astype(np.float16)
            mm[start:start + len(block)] = block
            store.write_rows(FEATURE, start, block)
    mm.flush()
    with h5py.File(h5_path, "w") as f:
        f.create_dataset("data", data=mm, chunks=(min(n, 4096), 1, DIM))
        f.create_dataset("clip_id", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())
    del mm
    print(f"built {n} clips in {time.perf_counter() - t:.1f} s -> {work}", file=sys.stderr)
    marker.write_text(json.dumps(spec))
    return store_path, h5_path, npy_path


# -------------------------------------------------------------------------- timed in a process
_PROBES = {
    "open_get": """
from featurestore import open_store
t = time.perf_counter()
s = open_store(STORE)
x = s.get(FEATURE, ID)
out = time.perf_counter() - t
""",
    "ls": """
from featurestore import open_store
from featurestore.cli import describe_store
t = time.perf_counter()
with open_store(STORE) as s:
    d = describe_store(s)
out = time.perf_counter() - t
""",
    "feature_info": """
from featurestore import open_store
s = open_store(STORE)
t = time.perf_counter()
info = s.feature_info(FEATURE)
out = time.perf_counter() - t
""",
    "h5py_dict": """
t = time.perf_counter()
f = h5py.File(H5, "r")
row_of = {c.decode(): i for i, c in enumerate(f["clip_id"][:])}
x = f["data"][row_of[ID]]
out = time.perf_counter() - t
""",
    "memmap": """
t = time.perf_counter()
m = np.load(NPY, mmap_mode="r")
x = np.array(m[ROW])
out = time.perf_counter() - t
""",
}


def probe(name: str, paths: tuple[Path, Path, Path], row: int, code_dir: Path) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of one probe in a fresh process running the code in ``code_dir``."""
    store, h5, npy = paths
    # every probe imports the same modules before its clock starts: "excluding imports", same RSS base
    head = ("import time, numpy as np, h5py, featurestore.cli, featurestore.store._zarr\n"
            f"STORE, H5, NPY = {str(store)!r}, {str(h5)!r}, {str(npy)!r}\n"
            f"FEATURE, ID, ROW = {FEATURE!r}, {clip_id(row)!r}, {row}\n")
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec (the parent's peak), VmHWM is the
    # new process's own
    tail = ("\nhwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
            "print(out, int(hwm) / 1024)\n")
    env = {**os.environ, "PYTHONPATH": str(code_dir)}
    done = subprocess.run([sys.executable, "-c", head + _PROBES[name] + tail], env=env, capture_output=True,
                          text=True, check=True, cwd=str(code_dir))
    seconds, rss = done.stdout.split()[-2:]
    return float(seconds), float(rss)


def cli_ls(store: Path, code_dir: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(code_dir)}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import sys; from featurestore.cli import main; sys.exit(main())",
                    "ls", str(store)], env=env, capture_output=True, check=True, cwd=str(code_dir))
    return time.perf_counter() - t


def tiny_store(args: argparse.Namespace) -> Path:
    """A 10-clip store: ``featurestore ls`` on it is the command's start-up (imports) alone."""
    from featurestore import ClipRecord, Manifest, create_store

    path = Path(args.workdir) / "tiny.zarr"
    if not (path / "zarr.json").exists():
        create_store(path, Manifest("tiny", CLASSES, [ClipRecord(clip_id(i)) for i in range(10)])).close()
    return path


def median_probe(name: str, paths, rows: list[int], code_dir: Path) -> tuple[float, float]:
    runs = [probe(name, paths, row, code_dir) for row in rows]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def lookup_sweep(args: argparse.Namespace, chunk_rows: list[int]) -> None:
    """The lookup table's chunk size: one cold id (fence + one table chunk, fresh index each time)
    and 1,024 random ids (the whole table), with the table written at each size; in this process."""
    from featurestore import open_store
    from featurestore.store import index

    n = args.clips
    rng = np.random.default_rng(args.seed + 2)
    picks = [clip_id(int(i)) for i in rng.integers(0, n, 200)]
    batch = [clip_id(int(i)) for i in rng.integers(0, n, 1024)]
    keep = index.LOOKUP_CHUNK_ROWS
    for rows in chunk_rows:
        path = Path(args.workdir) / f"lookup-{n}-{rows}.zarr"
        index.LOOKUP_CHUNK_ROWS = rows
        try:
            with open_store(path, "w") as store:  # an index alone: ids through the public API
                from featurestore import ClipRecord, Manifest

                store.append_clips(Manifest("sweep", CLASSES, [ClipRecord(clip_id(i)) for i in range(n)]))
        finally:
            index.LOOKUP_CHUNK_ROWS = keep
        with open_store(path) as store:
            one = []
            for cid in picks:
                store.index.forget()
                t = time.perf_counter()
                store.row(cid)
                one.append(time.perf_counter() - t)
            many = []
            for _ in range(5):
                store.index.forget()
                t = time.perf_counter()
                store.rows(batch)
                many.append(time.perf_counter() - t)
        print(f"lookup chunks of {rows:>6} rows ({rows * 24 // 1024} KiB): one cold id "
              f"{statistics.median(one) * 1e3:.2f} ms (fence included), "
              f"1,024 ids {statistics.median(many) * 1e3:.1f} ms")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.lookup_sweep:
        lookup_sweep(args, args.lookup_sweep)
        return 0
    paths = build(args)
    rows = np.random.default_rng(args.seed + 1).integers(0, args.clips, args.repeats).tolist()
    tiny = tiny_store(args)
    codes = {"after": REPO}
    if args.before:
        codes = {"before": Path(args.before).resolve(), **codes}
    print(f"{args.clips:,} clips x 1 x {DIM} float16; median of {args.repeats} fresh processes; "
          f"load {Path('/proc/loadavg').read_text().split()[:3]}")
    ref, ref_rss = median_probe("h5py_dict", paths, rows, REPO)
    mem, _ = median_probe("memmap", paths, rows, REPO)
    print(f"reference: h5py + id dict open + first row {ref * 1e3:.1f} ms (peak RSS {ref_rss:.0f} MiB); "
          f"numpy memmap {mem * 1e3:.2f} ms")
    results = {}
    for label, code in codes.items():
        t_get, rss = median_probe("open_get", paths, rows, code)
        t_ls, _ = median_probe("ls", paths, rows, code)
        t_info, _ = median_probe("feature_info", paths, rows, code)
        t_cli = statistics.median(cli_ls(paths[0], code) for _ in rows)
        t_tiny = statistics.median(cli_ls(tiny, code) for _ in rows)
        results[label] = (t_get, t_ls, t_info, t_cli, rss)
        print(f"{label:>6}: open + first get {t_get * 1e3:8.1f} ms ({t_get / ref:5.2f}x h5py+dict)   "
              f"ls {t_ls * 1e3:8.1f} ms   feature_info {t_info * 1e3:8.1f} ms   "
              f"`featurestore ls` process {t_cli:5.2f} s (10-clip store: {t_tiny:.2f} s)   "
              f"peak RSS {rss:.0f} MiB ({rss / ref_rss:.2f}x)")
    if "before" in results:
        b, a = results["before"], results["after"]
        print(f"before/after: open + first get {b[0] / a[0]:.1f}x faster, ls {b[1] / a[1]:.1f}x, "
              f"feature_info {b[2] / a[2]:.1f}x, `featurestore ls` {b[3] / a[3]:.1f}x")
    t_get, t_ls = results["after"][:2]
    ok = t_get <= 0.3 and t_ls <= 0.5
    print(f"floors: open + first get <= 0.3 s: {'met' if t_get <= 0.3 else 'MISSED'}; "
          f"ls <= 0.5 s: {'met' if t_ls <= 0.5 else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
