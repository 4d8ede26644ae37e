"""Fusion recipes: which prediction runs form which family, and which rules apply, as JSON data.

A recipe is data, not code, so the paper's E01/E02 and any variant are files under
``scripts/recipes/fusion/`` that the CLI reads. Example (the paper's E02)::

    {
      "name": "E02",
      "families": {"A04": ["A01", "A02", "A03"], "V04": ["V01", "V02", "V03"], "C04": ["C04"]},
      "replacement": {"source": "A04", "targets": ["V04", "C04"], "margin": 0.2},
      "class_weights": {"select": {"A04": ["bus", "park", "tram"]}},
      "postprocess": {"method": "eq1"}
    }

Unknown keys are errors that list the keys that exist; runs, families, classes and splits are
checked against the store by :func:`fusion.pipeline.validate_recipe`.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from featurestore.atomic_files import atomic_write_text
from fusion.aggregate import AGGREGATORS
from fusion.calibration import CALIBRATORS

VAL_SPLIT_REF = "@val_split"  # a fit split written like this means "the runs' own val_split attr"


class RecipeError(ValueError):
    """A recipe file is malformed or names something that does not exist."""


@dataclass
class Replacement:
    """Replace the target families' rows by the source family's where they are far less confident."""

    source: str                  # family whose probabilities replace (the audio ensemble A04)
    targets: list[str]           # families that get replaced (V04, C04)
    margin: float = 0.20         # replace when target max <= source max - margin


@dataclass
class ClassWeights:
    """Class-wise family weights: selection masks and/or validation-confidence weights."""

    select: dict[str, list[str]] = field(default_factory=dict)  # family -> the only classes it counts for
    confidence_fit_split: str | None = None  # fit per-class confidence weights on this split


@dataclass
class PostProcess:
    """Equation (1) of the paper."""

    method: str = "eq1"          # the only method: the paper's step clamp
    renormalize: bool = False    # rescale rows after the clamp (the paper does not)


@dataclass
class Calibration:
    """A calibrator fitted on ``fit_split`` and applied to the evaluated split."""

    method: str                  # "temperature" or "stacking"
    fit_split: str = VAL_SPLIT_REF  # a labelled split disjoint from the evaluated one
    stack_on: str = "fused"      # stacking input: "fused" output or "families" side by side
    cross_fit: int = 0           # >= 2: clips inside the fit split are calibrated by K location-disjoint fits
    params: dict[str, Any] = field(default_factory=dict)  # e.g. {"C": 0.5} for stacking

    def __post_init__(self) -> None:
        # checked here, not only in FusionRecipe: evaluate builds its comparison calibrations directly
        if self.method not in CALIBRATORS:
            raise RecipeError(f"unknown calibration method {self.method!r}; expected one of {list(CALIBRATORS)}")
        if self.stack_on not in ("fused", "families"):
            raise RecipeError(f"calibration.stack_on must be 'fused' or 'families', found {self.stack_on!r}")
        if self.cross_fit == 1 or self.cross_fit < 0:
            raise RecipeError(f"calibration.cross_fit must be 0 (off) or >= 2, found {self.cross_fit}")


@dataclass
class FusionRecipe:
    """A complete fusion: families of runs, rules, post-processing or calibration, metric options."""

    name: str
    families: dict[str, list[str]]               # family name -> prediction runs averaged equally
    description: str = ""
    eval_split: str = "fold1_evaluate"           # default split for evaluate/report
    aggregation: str = "mean"                    # segment -> clip aggregation
    replacement: Replacement | None = None
    class_weights: ClassWeights | None = None
    renormalize_fused: bool = True               # rescale fused rows to sum to one
    postprocess: PostProcess | None = None
    calibration: Calibration | None = None
    metric_renormalize: bool = True              # score renormalised rows (the 2021 scorer)

    def __post_init__(self) -> None:
        self._check()

    def _check(self) -> None:
        if not self.families or any(not runs for runs in self.families.values()):
            raise RecipeError(f"recipe {self.name!r}: expected at least one family, each with at least one run; found {self.families}")
        if self.aggregation not in AGGREGATORS:
            raise RecipeError(f"recipe {self.name!r}: unknown aggregation {self.aggregation!r}; expected one of {sorted(AGGREGATORS)}")
        names = set(self.families)
        if self.replacement:
            used = {self.replacement.source, *self.replacement.targets}
            if used - names:
                raise RecipeError(f"recipe {self.name!r}: replacement names unknown families {sorted(used - names)}; families are {sorted(names)}")
        if self.class_weights and set(self.class_weights.select) - names:
            raise RecipeError(f"recipe {self.name!r}: class_weights.select names unknown families {sorted(set(self.class_weights.select) - names)}; families are {sorted(names)}")
        if self.postprocess and self.postprocess.method != "eq1":
            raise RecipeError(f"recipe {self.name!r}: unknown postprocess method {self.postprocess.method!r}; expected 'eq1'")

    @property
    def runs(self) -> list[str]:
        """Every run the recipe reads, in family order, without repeats."""
        return list(dict.fromkeys(r for runs in self.families.values() for r in runs))

    @classmethod
    def from_dict(cls, data: dict, source: str = "recipe") -> "FusionRecipe":
        data = _strict(cls, data, source)
        nested = {"replacement": Replacement, "class_weights": ClassWeights,
                  "postprocess": PostProcess, "calibration": Calibration}
        for key, kind in nested.items():
            if data.get(key) is not None:
                try:
                    data[key] = kind(**_strict(kind, data[key], f"{source}.{key}"))
                except RecipeError as err:
                    raise RecipeError(f"recipe {data.get('name')!r}: {err}") from None
        return cls(**data)

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> "FusionRecipe":
        """Read a recipe from a JSON file path or a JSON string."""
        text, source = _read(path_or_text)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise RecipeError(f"{source}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: expected a JSON object, found {type(data).__name__}")
        return cls.from_dict(data, source)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        """The recipe as JSON text; also written to ``path`` when given (whole, or the old file stays)."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            atomic_write_text(path, text)
        return text


def _read(path_or_text: str | Path) -> tuple[str, str]:
    if isinstance(path_or_text, str) and path_or_text.lstrip().startswith("{"):
        return path_or_text, "recipe text"
    path = Path(path_or_text)
    if not path.exists() or path.is_dir():
        raise RecipeError(f"recipe file {str(path)!r} does not exist")
    return path.read_text(), str(path)


def _strict(kind: type, data: Any, where: str) -> dict:
    """Check a dict against a dataclass's fields: unknown keys and missing required keys are errors."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a JSON object, found {type(data).__name__}")
    allowed = {f.name for f in fields(kind)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; allowed keys are {sorted(allowed)}")
    required = {f.name for f in fields(kind) if f.default is MISSING and f.default_factory is MISSING}
    missing = sorted(required - set(data))
    if missing:
        raise RecipeError(f"{where}: missing required key(s) {missing}")
    return dict(data)
