"""Benchmark: start-up of the command lines and of the config modules, this tree against another.

Typed configs (pydantic, `featurestore.typed_config`) cost an import on every ``heads`` and ``fusion``
start-up; this measures what they cost. Each case runs ``--repeats`` times in a fresh process per
tree, the trees alternating so that load from other processes hits both alike; it prints wall and
CPU (user + sys of the child) time, min and median, and the ratio of the CPU medians (CPU time is
far less sensitive than wall time to a loaded machine). ``--before DIR`` is a tree holding the
packages at another commit, made with e.g. ``mkdir /tmp/old && git archive <commit> featurestore
heads fusion | tar -x -C /tmp/old``; without it only this tree is timed.

Usage:
    .venv/bin/python scripts/bench/bench_startup.py [--before /tmp/old] [--repeats 9]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CASES = {
    "import heads.config": "import heads.config",
    "import fusion.recipe": "import fusion.recipe",
    "heads --help": "import sys; sys.argv = ['heads', '--help']; from heads.cli import main; main()",
    "fusion --help": "import sys; sys.argv = ['fusion', '--help']; from fusion.cli import main; main()",
    "import pydantic (alone)": "import pydantic.dataclasses",
}


def _run(code: str, root: str) -> tuple[float, float]:
    """(wall, CPU) seconds of one fresh interpreter running ``code`` with ``root`` first on the path."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd="/tmp", env={**os.environ, "PYTHONPATH": root},
                   capture_output=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="a tree with the packages at another commit")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    trees = {"this": str(REPO), **({"before": args.before} if args.before else {})}
    times: dict[tuple[str, str], list[tuple[float, float]]] = {(c, t): [] for c in CASES for t in trees}
    for _ in range(args.repeats):
        for case, code in CASES.items():
            for tree, root in trees.items():
                times[(case, tree)].append(_run(code, root))
    with open("/proc/loadavg") as f:
        print(f"load average after: {f.read().strip()}")
    for case in CASES:
        for tree in trees:
            wall, cpu = zip(*times[(case, tree)])
            print(f"{case:24s} {tree:6s} wall min {min(wall):.3f} s median {statistics.median(wall):.3f} s; "
                  f"CPU min {min(cpu):.3f} s median {statistics.median(cpu):.3f} s")
        if "before" in trees:
            ratio = statistics.median(c for _, c in times[(case, "this")]) / statistics.median(
                c for _, c in times[(case, "before")])
            print(f"{case:24s} this / before, CPU medians: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
