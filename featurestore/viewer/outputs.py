"""Class probabilities the viewer can show: stored prediction runs, and outputs other packages provide.

``featurestore`` never imports ``heads`` or ``fusion`` (docs/architecture.md). Fused outputs of a
recipe are computed by ``fusion``, so ``fusion`` offers them to the viewer through the Python entry
point group ``featurestore.view_outputs``: each entry point is a function ``(store, recipes) ->
dict[name, (score, covered)]`` where ``score(clip_ids) -> float [n, n_classes]`` gives clip-level
probabilities and ``covered() -> bool [n_clips]`` says which store rows it answers for.
The viewer looks the group up at start (`load_sources`); with no provider installed it shows the
stored runs only.

Stored runs are clip-level by the mean over segments (``[n, n_segments, n_classes]`` ->
``[n, n_classes]``), the aggregation every head's evaluation starts from.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import numpy as np

from featurestore.store.row_group import PREDICTION_RUNS

GROUP = "featurestore.view_outputs"
Scorer = Callable[[Sequence[str]], np.ndarray]


@dataclass
class Source:
    """One output: ``score(clip_ids) -> [n, n_classes]``; ``covered()`` the store rows it answers for."""

    name: str
    score: Scorer
    covered: Callable[[], np.ndarray]


def run_source(store: Any, run: str) -> Source:
    """A stored prediction run, clip-level by the mean over its segments; it covers its done clips."""
    return Source(f"run:{run}", lambda clip_ids: store.get_predictions(run, list(clip_ids)).mean(axis=1),
                  lambda: store.row_group(PREDICTION_RUNS, run).done_mask())


def load_sources(store: Any, recipes: Sequence[str] = ()) -> dict[str, Source]:
    """Every output to show: ``run:<name>`` per stored run, then ``<provider>:<name>`` per provided one.

    A provider's error (a recipe that cannot be read, runs the store lacks) is one ValueError line
    naming the provider: the recipes were asked for, so the viewer does not start without them.
    """
    sources = {f"run:{run}": run_source(store, run) for run in store.prediction_runs()}
    if not recipes:  # providers answer recipes: without any, loading them (fusion, pydantic: ~10 MiB) is for nothing
        return sources
    points = list(entry_points(group=GROUP))
    if recipes and not points:
        raise ValueError(f"recipes were given ({', '.join(recipes)}) but no package provides fused outputs "
                         f"(entry point group {GROUP}); install the avscene distribution with fusion")
    for point in points:
        try:
            provided = point.load()(store, list(recipes))
        except Exception as err:  # a provider's own error, said in one line naming it
            raise ValueError(f"the {point.name} outputs ({point.value}): {err}") from err
        for name, (score, covered) in provided.items():
            sources[f"{point.name}:{name}"] = Source(f"{point.name}:{name}", score, covered)
    return sources
