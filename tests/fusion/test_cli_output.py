"""``fusion runs/submit --json`` print what they did as one JSON object; every option has help text."""
from __future__ import annotations

import argparse
import json

import pytest

from fusion.cli import build_parser, main


def test_runs_json_lists_every_run_with_its_inputs_and_random_flags(tiny_store_path, capsys):
    assert main(["runs", "--store", str(tiny_store_path), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert sorted(runs) == ["A01", "A02", "C04", "V01", "V02"]
    assert runs["V01"]["random"] is True and runs["V01"]["random_features"] == ["timm/test_vit"]
    assert runs["C04"]["random"] is False and runs["C04"]["video_inputs"] == ["clip/ViT-B-32"]
    assert runs["A01"]["audio_inputs"] == ["logmel"] and runs["A01"]["val_split"] == "fold1_val"


def test_submit_json_names_the_file_and_the_clip_count(tiny_store_path, paper_recipe_dict, tmp_path, capsys):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(paper_recipe_dict))
    out = tmp_path / "submission.csv"
    assert main(["submit", "--store", str(tiny_store_path), "--recipe", str(recipe), "--split", "fold1_test",
                 "--out", str(out), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer == {"recipe": "E02-tiny", "split": "fold1_test", "path": str(out), "clips": 8}
    assert len(out.read_text().splitlines()) == 9


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_option_has_help(command):
    for action in _subcommands()[command]._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        assert action.help and action.help.strip(), f"fusion {command}: {action.option_strings or action.dest}"
