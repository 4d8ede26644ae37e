"""Shared steps of the end-to-end recipes (``demo.py``, ``reproduce_dcase2021.py``).

Each step runs the same command line a user would type (the packages' ``main(argv)``), in this
process, after printing it: the recipes double as a transcript of how to use the tools.
"""
from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import featurestore.cli
import fusion.cli
import heads.cli

_MAINS = {"featurestore": featurestore.cli.main, "heads": heads.cli.main, "fusion": fusion.cli.main}


class StepFailed(RuntimeError):
    """A step's command exited non-zero: the recipe stops there, naming the command."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code  # the command's exit status (130: Ctrl-C)


class PreflightError(ValueError):
    """Bad input found before any work (a missing dataset file, a feature set no encoder makes)."""


@dataclass
class Transcript:
    """The commands run and the seconds each took, for the closing summary."""

    steps: list[tuple[str, float, int]] = field(default_factory=list)
    dry_run: bool = False  # print the commands without running them

    def run(self, tool: str, *args: str | Path, allow: tuple[int, ...] = (0,)) -> int:
        argv = [str(a) for a in args]
        line = " ".join([tool] + [shlex.quote(a) for a in argv])
        print(f"\n$ {line}", flush=True)
        if self.dry_run:
            self.steps.append((line, 0.0, 0))
            return 0
        start = time.perf_counter()
        code = _MAINS[tool](argv)
        code = 0 if code is None else int(code)
        self.steps.append((line, time.perf_counter() - start, code))
        if code not in allow:
            raise StepFailed(f"`{line}` exited with status {code}", code)
        return code

    def summary(self) -> str:
        if not self.steps:
            return "no steps"
        rows = [f"  {secs:7.1f} s  {line[:100]}" for line, secs, _ in self.steps]
        total = sum(secs for _, secs, _ in self.steps)
        return "\n".join(["steps:"] + rows + [f"  {total:7.1f} s  total"])


def train_and_predict(t: Transcript, store: Path, recipe: Path, run_id: str, runs_dir: Path,
                      device: str, extra: tuple[str, ...] = ()) -> None:
    """Train one head from a recipe into ``runs_dir/run_id`` and write ``predictions/<run_id>``."""
    out = runs_dir / run_id
    t.run("heads", "train", "--recipe", recipe, "--store", store, "--out", out, "--device", device, *extra)
    t.run("heads", "predict", "--store", store, "--run", out, "--name", run_id, "--device", device,
          "--overwrite")


def banner(text: str) -> None:
    print("\n" + "=" * 100 + f"\n{text}\n" + "=" * 100, flush=True)


def fail(err: StepFailed) -> int:
    """The recipe's exit status: 130 after a Ctrl-C (the command said what it kept), else 1."""
    if err.code == 130:
        print("\nINTERRUPTED: rerun the same command to resume (finished steps are kept)", file=sys.stderr)
        return 130
    print(f"\nFAILED: {err}", file=sys.stderr)
    return 1
