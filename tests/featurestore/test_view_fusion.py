"""Fused outputs in the viewer: fusion's provider, found through the ``featurestore.view_outputs`` entry point.

featurestore never imports fusion; this test checks the hand-over works end to end: a recipe given
to the viewer shows its fused probabilities on the clip page and in the confusion matrix, equal to
``fusion.pipeline.fuse`` on the same store.
"""
from __future__ import annotations

import json
from importlib.metadata import entry_points

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the viewer's [view] extra (starlette, uvicorn, plotly) is not installed")

from featurestore.store import open_store
from tests.featurestore.test_view import RUN, build_view_store, fetch, make_view_dataset

RECIPE = {"name": "two", "families": {"A": [RUN], "B": ["b02"]}, "eval_split": "fold1_evaluate",
          "aggregation": "mean", "replacement": {"source": "A", "targets": ["B"], "margin": 0.2}}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_view_dataset(tmp_path_factory.mktemp("fusion_view") / "demo")


def test_a_recipe_given_to_the_viewer_shows_its_fused_output(tmp_path, dataset):
    from featurestore.viewer import start
    from fusion.pipeline import fuse
    from fusion.recipe import FusionRecipe

    if not any(p.name == "fusion" for p in entry_points(group="featurestore.view_outputs")):
        pytest.fail("the fusion provider is not registered: reinstall the package (pip install -e .)")
    path = build_view_store(tmp_path / "s.zarr", dataset)
    with open_store(path, "a") as store:
        probs = np.random.default_rng(1).dirichlet(np.ones(len(store.classes)), size=(store.n_clips, 2))
        store.create_predictions("b02", 2, {"head": "other"})
        store.write_predictions("b02", np.arange(store.n_clips), probs)
        clip = store.clip_ids[7]
    recipe_file = tmp_path / "two.json"
    recipe_file.write_text(json.dumps(RECIPE))
    with open_store(path) as store:
        result = fuse(store, FusionRecipe.from_json(recipe_file), clip_ids=store.clip_ids)
        expected = result.final[result.clip_ids.index(clip)]
        labels = np.asarray(store.labels)
    running = start(path, recipes=[str(recipe_file)])
    try:
        page = fetch(running.url + f"clip?id={clip}")[1].decode()
        shown = [float(v) for v in __import__("re").findall(r"data-source='fusion:two' data-class='[^']+' data-value='([^']+)'", page)]
        np.testing.assert_allclose(shown, expected, rtol=1e-6)
        cm = json.loads(fetch(running.url + "api/confusion?source=fusion:two&split=")[1])
    finally:
        running.stop()
    predicted = result.final.argmax(1)
    truth = labels[[result.clip_ids.index(c) for c in result.clip_ids]]
    expected_counts = np.zeros((len(cm["classes"]),) * 2, dtype=int)
    np.add.at(expected_counts, (truth, predicted), 1)
    assert cm["counts"] == expected_counts.tolist()


def test_a_recipe_naming_runs_the_store_lacks_is_one_line(tmp_path, capsys, dataset):
    from featurestore.cli import main

    path = build_view_store(tmp_path / "s.zarr", dataset)
    recipe_file = tmp_path / "two.json"
    recipe_file.write_text(json.dumps(RECIPE))
    code = main(["view", str(path), "--port", "0", "--recipe", str(recipe_file)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("featurestore view: error: the fusion outputs")
    assert "'b02'" in err[0] and "two" in err[0]
