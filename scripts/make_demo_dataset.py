#!/usr/bin/env python
"""Write the synthetic TAU-layout demo dataset (real 24-bit WAVs and H.264 MP4s) to a directory.

Examples:
    python scripts/make_demo_dataset.py data/demo                       # 40 clips of 10 s
    python scripts/make_demo_dataset.py data/demo --clips-per-class 20 --seed 3
    python scripts/make_demo_dataset.py data/demo-eval --evaluation --n-clips 50
"""
from __future__ import annotations

import argparse
import sys

from featurestore.demo import DemoConfig, make_demo_dataset, make_demo_eval_dataset


def build_parser() -> argparse.ArgumentParser:
    d = DemoConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", help="output directory (new or empty)")
    p.add_argument("--clips-per-class", type=int, default=d.clips_per_class, help="development layout only")
    p.add_argument("--duration", type=float, default=None,
                   help=f"seconds per clip (default {d.duration:g}; 1 with --evaluation)")
    p.add_argument("--n-cities", type=int, default=d.n_cities, help="development layout only")
    p.add_argument("--seed", type=int, default=None, help="default 0 (1 with --evaluation)")
    p.add_argument("--sample-rate", type=int, default=d.sample_rate)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--height", type=int, default=d.height)
    p.add_argument("--fps", type=int, default=d.fps)
    p.add_argument("--night-fraction", type=float, default=d.night_fraction)
    p.add_argument("--clips-per-location", type=int, default=d.clips_per_location)
    p.add_argument("--evaluate-fraction", type=float, default=d.evaluate_fraction)
    p.add_argument("--evaluation", action="store_true",
                   help="write the evaluation layout (0.wav/0.mp4..., no labels) instead")
    p.add_argument("--n-clips", type=int, default=20, help="clips of the evaluation layout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common = dict(sample_rate=args.sample_rate, width=args.width, height=args.height, fps=args.fps,
                  night_fraction=args.night_fraction, progress=not args.quiet)
    try:
        if args.evaluation:
            make_demo_eval_dataset(args.root, n_clips=args.n_clips, duration=args.duration or 1.0,
                                   seed=1 if args.seed is None else args.seed, **common)
        else:
            make_demo_dataset(args.root, clips_per_class=args.clips_per_class,
                              duration=args.duration or DemoConfig().duration, n_cities=args.n_cities,
                              seed=args.seed or 0, clips_per_location=args.clips_per_location,
                              evaluate_fraction=args.evaluate_fraction, **common)
    except (ValueError, FileExistsError) as err:
        print(f"make_demo_dataset: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
