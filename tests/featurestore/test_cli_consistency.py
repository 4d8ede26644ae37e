"""The command lines agree: help text on every argument of every parser (featurestore, heads,
fusion), the store spelled STORE or --store STORE, -q/--quiet on commands with progress bars,
--json on convert and extract."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from tests.featurestore.test_extract_support import make_dataset

from featurestore import TAU_CLASSES, ClipRecord, Manifest, create_store, open_store
from featurestore.cli import build_parser, main


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Every top-level parser (their subcommands are walked by ``_walk``)."""
    import fusion.cli
    import heads.cli

    heads_parser = getattr(heads.cli, "build_parser", None) or heads.cli._parser
    return {"featurestore": build_parser(), "heads": heads_parser(), "fusion": fusion.cli.build_parser()}


def _walk(prog: str, parser: argparse.ArgumentParser):
    """``(where, action)`` for every argument of ``parser`` and of its subcommands, recursively;
    a subcommand itself appears as an action too (its one-line help in the command list)."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield f"{prog} {name}", helps.get(name)
                yield from _walk(f"{prog} {name}", sub)
            continue
        yield prog, action


def test_every_argument_of_every_command_has_help():
    missing = []
    for prog, parser in _parsers().items():
        for where, action in _walk(prog, parser):
            if action is None or not (action.help or "").strip():
                label = "/".join(action.option_strings) or action.dest if action is not None else "(command)"
                missing.append(f"{where}: {label}")
    assert not missing, "arguments without help text:\n  " + "\n  ".join(missing)


def _store(path: Path) -> Path:
    clips = [ClipRecord(f"c{i}", label=TAU_CLASSES[i], city="x", location="x-1", splits=frozenset({"all"}))
             for i in range(3)]
    with create_store(path, Manifest("toy", list(TAU_CLASSES), clips)) as store:
        store.create_feature_set("emb", 2, (4,), {"encoder": "emb", "config": {}, "weights": {"kind": "random"}},
                                 chunk_clips=4)
        store.write_rows("emb", 0, np.arange(24, dtype=np.float16).reshape(3, 2, 4))
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", [["ls", "{s}", "--json"], ["show", "{s}", "c1", "--json"], ["verify", "{s}", "--json"],
                                     ["search", "{s}", "--feature-set", "emb", "--like", "c1", "--json"],
                                     ["get", "{s}", "c1", "emb", "-o", "{o}"]])
def test_every_store_command_takes_the_store_either_way(tmp_path, capsys, command):
    store = str(_store(tmp_path / "s.zarr"))
    positional = [a.format(s=store, o=tmp_path / "a.npy") for a in command]
    option = [command[0], "--store", store] + [a.format(o=tmp_path / "b.npy") for a in command[2:]]
    first, second = run(capsys, *positional), run(capsys, *option)
    assert first[0] == 0 and second[0] == 0, (first, second)
    if command[0] == "search":  # the first search built the clip matrix, the second loaded it (a note says which)
        assert json.loads(first[1])["results"] == json.loads(second[1])["results"]
    else:
        assert first[1].replace("a.npy", "b.npy") == second[1]
    code, _, err = run(capsys, *positional[:1], "--store", store, *positional[1:])
    assert code == 2 and "the store is given twice" in err
    if command[0] in ("ls", "verify", "search"):  # no positional after STORE: leaving it out is noticed
        code, _, err = run(capsys, *option[:1], *option[3:])
        assert code == 2 and "give the store: STORE or --store STORE" in err


def test_convert_json_and_quiet(tmp_path, capsys):
    src = _store(tmp_path / "s.zarr")
    code, out, err = run(capsys, "convert", str(src), str(tmp_path / "s.h5"), "--json", "-q")
    assert code == 0 and err == ""
    report = json.loads(out)
    assert report["backend"] == "hdf5" and report["n_arrays"] > 5 and report["dst"] == str(tmp_path / "s.h5")
    with open_store(tmp_path / "s.h5") as copy:
        assert copy.feature_info("emb").n_done == 3


def test_extract_json_prints_only_the_summary_on_stdout(tmp_path, capsys):
    data = tmp_path / "data"
    make_dataset(data, 2, seconds=1.0, frames=1)
    code, out, err = run(capsys, "extract", str(data), "--store", str(tmp_path / "s.zarr"), "--encoders", "logmel",
                         "--segments", "1", "--num-workers", "0", "--json", "--summary-json", str(tmp_path / "x.json"))
    assert code == 0
    summary = json.loads(out)
    assert summary["clips_done"] == 2 and summary["features"]["logmel"]["written"] == 2
    assert "extract: 2 clips done" in err  # the summary line and the progress bar go to stderr
    assert json.loads((tmp_path / "x.json").read_text()) == summary
