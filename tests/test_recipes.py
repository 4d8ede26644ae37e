"""Every shipped recipe parses, and names only feature sets and runs that its end-to-end script produces.

The paper recipes cannot run here (no pretrained weights, no TAU data), so this is what keeps them
from rotting: a renamed feature set or head field fails here, not on someone's GPU hours later.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import heads
from fusion.recipe import FusionRecipe

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "scripts" / "recipes"
sys.path.insert(0, str(REPO / "scripts"))

import demo  # noqa: E402
import reproduce_dcase2021 as reproduce  # noqa: E402

def _feature_names(specs: str) -> set[str]:
    return {s.split("@")[0] for s in specs.split(",")}

def _check(recipe: Path, produced: set[str]) -> heads.TrainConfig:
    cfg = heads.TrainConfig.from_json(recipe)
    assert cfg.head in heads.list_heads()
    heads.make_config(cfg.head, cfg.head_config)  # unknown head fields raise
    needed = set(cfg.features) | ({cfg.head_config["class_features"]} if "class_features" in cfg.head_config else set())
    assert needed <= produced, f"{recipe.name} needs {sorted(needed - produced)}, not extracted by its script"
    return cfg

@pytest.mark.parametrize("recipe", sorted((RECIPES / "paper").glob("*.json")), ids=lambda p: p.stem)
def test_paper_recipes_use_what_the_reproduction_extracts(recipe):
    _check(recipe, _feature_names(reproduce.PAPER_ENCODERS))

@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("demo_*.json")), ids=lambda p: p.stem)
def test_demo_recipes_use_what_the_demo_extracts(recipe):
    _check(recipe, _feature_names(demo.DEMO_ENCODERS))

def test_every_demo_head_recipe_is_run_by_the_demo():
    run_by_demo = {name for _, name in demo.HEADS}
    assert run_by_demo <= {p.name for p in RECIPES.glob("demo_*.json")}

@pytest.mark.parametrize("recipe", sorted((RECIPES / "fusion").glob("*.json")), ids=lambda p: p.stem)
def test_fusion_recipes_name_runs_their_script_writes(recipe):
    parsed = FusionRecipe.from_json(recipe)
    runs = {r for members in parsed.families.values() for r in members}
    if recipe.stem.startswith("demo"):
        produced = {run_id for run_id, _ in demo.HEADS}
    elif recipe.stem == "tour":  # the README tour trains these runs
        readme = (REPO / "README.md").read_text().replace("\\\n", " ")  # join continued lines
        produced = set(re.findall(r"heads train .*--out tour/runs/(\S+)", readme))
    else:
        produced = {p.name.split("_")[0] for p in (RECIPES / "paper").glob("*.json")}
    assert runs <= produced, f"{recipe.name} reads runs {sorted(runs - produced)} that nothing writes"

def test_reproduction_dry_run_lists_every_step(capsys, tmp_path):
    assert reproduce.main(["--dataset", str(tmp_path / "tau"), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    commands = [l[2:] for l in capsys.readouterr().out.splitlines() if l.startswith("$ ")]
    assert commands[0].startswith("featurestore extract") and "--frames 12" in commands[0]
    trained = {c.split("--recipe ")[1].split()[0] for c in commands if c.startswith("heads train")}
    assert trained == {str(p) for p in (RECIPES / "paper").glob("*.json")}
    assert sum(c.startswith("fusion report") for c in commands) == len(reproduce.FUSION_RECIPES)
    assert not (tmp_path / "out").exists()  # a dry run writes nothing

PAPER_BACKBONES = {"A01": "regnetx_064", "A02": "resnest50d", "A03": "tf_efficientnet_b1",
                   "V01": "regnetx_064", "V02": "resnest50d", "V03": "hrnet_w18"}


@pytest.mark.parametrize("run", sorted(PAPER_BACKBONES))
def test_paper_cnn_recipes_follow_the_papers_training_recipe(run):
    """Table 5's backbones (RegNetX, not RegNetY), ImageNet weights, lr 0.1 (IBN-Net's default, the
    paper's 'as IBN-Net'), /10 at 5/10/15, 20 epochs, focal loss, batch 24 (audio) / 20 (video)."""
    (recipe,) = (RECIPES / "paper").glob(f"{run}_*.json")
    cfg = heads.TrainConfig.from_json(recipe)
    assert cfg.head == ("spectrogram_cnn" if run.startswith("A") else "frame_cnn")
    assert cfg.head_config["backbone"] == PAPER_BACKBONES[run]
    assert cfg.head_config["weights"].startswith("pretrained")  # A03: the Noisy Student tag ns_jft_in1k
    assert (cfg.lr, cfg.epochs, list(cfg.lr_milestones), cfg.lr_gamma) == (0.1, 20, [5, 10, 15], 0.1)
    assert (cfg.loss, cfg.focal_gamma) == ("focal", 2.0)
    assert cfg.batch_size == (24 if run.startswith("A") else 20)
    assert cfg.train_split == "fold1_train" and cfg.val_split == "fold1_evaluate"
