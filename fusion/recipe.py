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

Every key is typed (a strict pydantic dataclass, `featurestore.typed_config`): a value of the wrong
JSON type (``"margin": "0.2"``) or out of range, an unknown or a missing key is a `RecipeError` of one
line naming the file, the dotted key (``replacement.margin``), the value and what was expected. Runs,
families, classes and splits are checked against the store by :func:`fusion.pipeline.validate_recipe`.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from featurestore.atomic_files import atomic_write_text
from featurestore.typed_config import load_data, load_json, typed_config
from fusion.aggregate import AGGREGATORS
from fusion.calibration import CALIBRATORS, make_calibrator

VAL_SPLIT_REF = "@val_split"  # a fit split written like this means "the runs' own val_split attr"

Name = Annotated[str, Field(min_length=1)]  # a run, family, class or split name: never empty
Margin = Annotated[float, Field(ge=0, le=1)]  # a difference of two probabilities


class RecipeError(ValueError):
    """A recipe file is malformed or names something that does not exist."""


@typed_config(RecipeError)
class Replacement:
    """Replace the target families' rows by the source family's where they are far less confident."""

    source: Name                 # family whose probabilities replace (the audio ensemble A04)
    targets: Annotated[list[Name], Field(min_length=1)]  # families that get replaced (V04, C04)
    margin: Margin = 0.20        # replace when target max <= source max - margin, in [0, 1]


@typed_config(RecipeError)
class ClassWeights:
    """Class-wise family weights: selection masks and/or validation-confidence weights."""

    select: dict[Name, list[Name]] = field(default_factory=dict)  # family -> the only classes it counts for
    confidence_fit_split: Name | None = None  # fit per-class confidence weights on this split


@typed_config(RecipeError)
class PostProcess:
    """Equation (1) of the paper."""

    method: Literal["eq1"] = "eq1"  # the only method: the paper's step clamp
    renormalize: bool = False    # rescale rows after the clamp (the paper does not)


@typed_config(RecipeError)
class Calibration:
    """A calibrator fitted on ``fit_split`` and applied to the evaluated split."""

    method: Literal[CALIBRATORS]  # "temperature" or "stacking"
    fit_split: Name = VAL_SPLIT_REF  # a labelled split disjoint from the evaluated one
    stack_on: Literal["fused", "families"] = "fused"  # stacking input: "fused" output or "families" side by side
    cross_fit: Annotated[int, Field(ge=0)] = 0  # >= 2: clips inside the fit split are calibrated by K location-disjoint fits
    params: dict[str, Any] = field(default_factory=dict)  # e.g. {"C": 0.5} for stacking

    def __post_init__(self) -> None:
        # checked here, not only in FusionRecipe: evaluate builds its comparison calibrations directly
        if self.cross_fit == 1:
            raise RecipeError(f"cross_fit must be 0 (off) or >= 2, found {self.cross_fit}")
        check_calibration_params(self.method, self.params)


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _temperature_bounds(value: Any) -> bool:
    """Two finite JSON numbers 0 < low <= high (the calibrator's own check, after the JSON types)."""
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(_positive_number(v) for v in value)):
        return False
    try:
        make_calibrator("temperature", 2, bounds=tuple(value))
    except ValueError:
        return False
    return True


#: method -> parameter -> (check, what it must be): the keyword arguments of each calibrator
#: (`fusion.calibration.make_calibrator`), checked when the recipe is loaded: params is free-form
#: JSON, so an unknown name would otherwise be a TypeError traceback, and a bad value a scikit-learn
#: or scipy message naming neither the recipe nor the key, after the store was read.
CALIBRATION_PARAMS: dict[str, dict[str, tuple[Any, str]]] = {
    "temperature": {"bounds": (_temperature_bounds, "two finite temperatures [low, high] with 0 < low <= high")},
    "stacking": {"C": (_positive_number, "a finite number > 0 (inverse regularisation strength)"),
                 "max_iter": (_positive_int, "an integer >= 1")},
}


def check_calibration_params(method: str, params: dict[str, Any]) -> None:
    """Refuse a calibrator parameter that is unknown for ``method`` or of the wrong JSON type or range.

    Raises:
        RecipeError: ``params.C: expected a finite number > 0 ..., got -1``.
    """
    allowed = CALIBRATION_PARAMS.get(method, {})
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise RecipeError(f"params: unknown parameter(s) {unknown} for {method!r} calibration; allowed: "
                          f"{sorted(allowed) or '(none)'}")
    for name, value in params.items():
        check, expected = allowed[name]
        if not check(value):
            raise RecipeError(f"params.{name}: expected {expected}, got {json.dumps(value)}")


@typed_config(RecipeError)
class FusionRecipe:
    """A complete fusion: families of runs, rules, post-processing or calibration, metric options.

    Every field is typed and checked when the recipe is built or loaded (pydantic, strict: a JSON
    ``"margin": "0.2"`` is refused naming ``replacement.margin``); `_check` adds what types cannot say.
    """

    name: Name
    families: Annotated[dict[Name, Annotated[list[Name], Field(min_length=1)]], Field(min_length=1)]  # family name -> prediction runs averaged equally
    description: str = ""
    eval_split: Name = "fold1_evaluate"          # default split for evaluate/report
    aggregation: Literal[tuple(AGGREGATORS)] = "mean"  # segment -> clip aggregation
    replacement: Replacement | None = None
    class_weights: ClassWeights | None = None
    renormalize_fused: bool = True               # rescale fused rows to sum to one
    postprocess: PostProcess | None = None
    calibration: Calibration | None = None
    metric_renormalize: bool = True              # score renormalised rows (the 2021 scorer)

    def __post_init__(self) -> None:
        self._check()

    def _check(self) -> None:
        """Families named by the rules must exist (the store-dependent checks are `fusion.pipeline.validate_recipe`)."""
        names = set(self.families)
        for family, runs in self.families.items():  # a run listed twice would weigh twice in the family's mean
            repeated = sorted({r for r in runs if runs.count(r) > 1})
            if repeated:
                raise RecipeError(f"recipe {self.name!r}: family {family!r} lists run(s) {repeated} more than once; "
                                  f"a family's runs are averaged equally, so each is listed once")
        if self.replacement:
            used = {self.replacement.source, *self.replacement.targets}
            if used - names:
                raise RecipeError(f"recipe {self.name!r}: replacement names unknown families {sorted(used - names)}; families are {sorted(names)}")
            if self.replacement.source in self.replacement.targets:  # it would replace rows by themselves: a no-op
                raise RecipeError(f"recipe {self.name!r}: replacement.targets holds its own source "
                                  f"{self.replacement.source!r}; a family cannot replace its own rows")
        if self.class_weights and set(self.class_weights.select) - names:
            raise RecipeError(f"recipe {self.name!r}: class_weights.select names unknown families {sorted(set(self.class_weights.select) - names)}; families are {sorted(names)}")

    @property
    def runs(self) -> list[str]:
        """Every run the recipe reads, in family order, without repeats."""
        return list(dict.fromkeys(r for runs in self.families.values() for r in runs))

    @classmethod
    def from_dict(cls, data: dict, source: str = "recipe") -> "FusionRecipe":
        """A recipe from parsed JSON data, as strictly as a file (``"margin": "0.2"`` is refused)."""
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: expected a JSON object, found {type(data).__name__}")
        return load_data(cls, data, source, RecipeError)

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> "FusionRecipe":
        """Read a recipe from a JSON file path or a JSON string.

        Raises:
            RecipeError: no such file, not JSON, or a key unknown, missing, of the wrong type or out of
                range (one line naming the file, the dotted key, the value and what was expected).
        """
        text, source = _read(path_or_text)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise RecipeError(f"{source}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: expected a JSON object, found {type(data).__name__}")
        return load_json(cls, text, source, RecipeError)  # (a key given twice is refused there)

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
    return path.read_text(encoding="utf-8"), str(path)  # (JSON is UTF-8, whatever the locale)

