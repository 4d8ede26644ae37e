"""What an extraction run reports: counts, failures, per-stage times, random-weights warnings."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the pipeline imports torch; the summary is read without it
    from featurestore.extract.pipeline import RunStats
    from featurestore.extract.plan import Plan

#: Failures listed one per line after the summary before the rest is counted.
SHOWN_FAILURES = 20


@dataclass
class FeatureSetSummary:
    """One feature set in one run.

    Attributes:
        name: feature set name.
        encoder: the encoder spec (weights included).
        written: clips this run wrote, each once (a Dask run counts them from the store, so the rows
            a killed task's first attempt wrote before its retry skipped them count too).
        skipped: selected clips that were already done.
        failed: clips that failed in this run.
        random_weights: the encoder ran with randomly initialised weights.
    """

    name: str
    encoder: str
    written: int = 0
    skipped: int = 0
    failed: int = 0
    random_weights: bool = False


@dataclass
class ExtractSummary:
    """The outcome of ``featurestore.extract.extract``.

    Attributes:
        store: store location.
        device: device the encoders ran on (``cuda:0``, ``cpu``, or ``dask (...)``).
        clips_selected: clips this run covered (after ``limit``).
        clips_done: clips computed in this run for every requested feature set without error.
        clips_skipped: clips that needed no work (all requested feature sets already done).
        failures: clip id -> {feature set: error message}, for clips that failed in this run.
        features: per feature set counts.
        class_features: text encoders -> ``"written"`` or ``"unchanged"``.
        stage_seconds: decode per source, preprocess, encode per encoder, write, wait for input.
            Decode and preprocess are summed over worker processes, so the sum of the stages may
            exceed ``wall_seconds``: that difference is the overlap.
        wall_seconds: the whole run: reading the dataset, building encoders, planning, the pipeline.
        pipeline_seconds: decode + encode + write of the clips (the part the stages overlap in).
        random_weights: names of feature sets whose encoder used random weights.
    """

    store: str
    device: str
    clips_selected: int = 0
    clips_done: int = 0
    clips_skipped: int = 0
    failures: dict[str, dict[str, str]] = field(default_factory=dict)
    features: dict[str, FeatureSetSummary] = field(default_factory=dict)
    class_features: dict[str, str] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0
    pipeline_seconds: float = 0.0
    random_weights: list[str] = field(default_factory=list)

    @property
    def clips_failed(self) -> int:
        return len(self.failures)

    @property
    def ok(self) -> bool:
        """True when no clip failed in this run."""
        return not self.failures

    @property
    def exit_code(self) -> int:
        """0 when every selected clip is done, 1 when some failed (the CLI's exit code)."""
        return 0 if self.ok else 1

    def stages_total(self) -> float:
        """Sum of the busy stages (everything but waiting): compare with ``wall_seconds``."""
        return sum(v for k, v in self.stage_seconds.items() if k != "wait for input")

    def line(self) -> str:
        """The one-line summary printed at the end of a run."""
        rate = self.clips_done / self.wall_seconds if self.wall_seconds > 0 else 0.0
        stages = ", ".join(f"{_stage_label(k)} {v:.1f} s" for k, v in ordered_stages(self.stage_seconds))
        text = (f"extract: {self.clips_done} clips done, {self.clips_skipped} skipped, {self.clips_failed} failed "
                f"of {self.clips_selected} in {self.wall_seconds:.1f} s ({rate:.1f} clips/s) on {self.device}")
        if stages:
            text += f"; pipeline {self.pipeline_seconds:.1f} s: {stages}"
        if self.random_weights:
            text += f"; RANDOM weights: {', '.join(self.random_weights)}"
        return text

    def failure_lines(self, limit: int = SHOWN_FAILURES) -> list[str]:
        """One line per failed clip (feature set: message), then a count of the rest."""
        lines = []
        for clip_id, errors in list(self.failures.items())[:limit]:
            detail = "; ".join(f"{name}: {msg}" for name, msg in errors.items())
            lines.append(f"  FAILED {clip_id}: {detail}")
        if len(self.failures) > limit:
            lines.append(f"  ... and {len(self.failures) - limit} more failed clips "
                         f"(store.errors(<feature set>) lists them all)")
        if any(": too short: " in m or ": too long: " in m for e in self.failures.values() for m in e.values()):
            lines.append("  hint: audio is cut into the dataset's number of segments; if your clips have "
                         "another length, pass --segments N (extract(..., segments=N))")
        return lines

    def to_dict(self) -> dict:
        out = asdict(self)
        out["clips_failed"] = self.clips_failed
        return out


def fill_summary(summary: ExtractSummary, plan: Plan, stats: RunStats, clip_ids: list[str]) -> None:
    """Count what the pipeline did (``stats``) into ``summary``, per feature set of ``plan``."""
    for target in plan.targets:
        failed = stats.failed.get(target.name, {})
        summary.features[target.name] = FeatureSetSummary(
            target.name, target.spec, stats.written.get(target.name, 0), target.skipped, len(failed),
            target.random_weights)
        for row, message in sorted(failed.items()):
            summary.failures.setdefault(clip_ids[row], {})[target.name] = message
    summary.clips_skipped = int((plan.selected & ~plan.needed_any()).sum())
    summary.clips_done = stats.clips - len(summary.failures)
    summary.stage_seconds = dict(ordered_stages(stats.seconds))


def ordered_stages(seconds: dict[str, float]) -> list[tuple[str, float]]:
    """Stages in pipeline order: decode, preprocess, encoders (in run order), write, waiting."""
    order = ("decode", "preprocess", "encode", "write", "wait")

    def rank(key: str) -> int:
        return next((i for i, p in enumerate(order) if key.startswith(p)), len(order))

    return sorted(seconds.items(), key=lambda kv: rank(kv[0]))


def _stage_label(key: str) -> str:
    if key.startswith("encode "):
        return key[len("encode "):]
    if key == "wait for input":
        return "device idle waiting for input"
    return key
