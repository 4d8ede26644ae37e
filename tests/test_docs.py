"""README.md and docs/*.md run as written: every ``bash`` and ``python`` block, in order, in one sandbox.

The README's tour goes first and makes the data (``demo/data``, ``demo/store.zarr``, ``runs/``); the
docs' blocks then run on what it made, file by file in the order of ``DOC_ORDER``. The sandbox holds
links to the repository's ``scripts/`` and to this interpreter's ``.venv``, so paths read exactly as
a reader at the repository root types them. Running everything takes minutes, so it is marked
``docs`` and left out of a plain ``pytest`` (``.ci/run`` runs it: ``pytest -m docs``); the check that
every fence has a language and every skip a reason is fast and always runs.
"""
from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docblocks import RUN_LANGUAGES, SHOWN_LANGUAGES, Block, read_blocks

REPO = Path(__file__).resolve().parent.parent
#: README first (its tour makes the data), then the docs in the order a reader meets them.
DOC_ORDER = ["README.md", "docs/store.md", "docs/datasets-and-decoding.md", "docs/encoders.md",
             "docs/extraction.md", "docs/heads.md", "docs/fusion.md", "docs/view.md", "docs/scaling.md", "docs/reliability.md",
             "docs/architecture.md", "docs/benchmarks.md"]
BLOCK_TIMEOUT_S = 1200

#: Runs python blocks one after another in one namespace, so a later block may use an earlier one's
#: names as a reader's session would; each block's result is one JSON line after a marker.
_DRIVER = r"""
import json, sys, traceback
MARK = sys.argv[1]
namespace = {"__name__": "__main__"}
for raw in sys.stdin:
    block = json.loads(raw)
    try:
        exec(compile(block["text"], block["where"], "exec"), namespace)
        result = {"ok": True}
    except BaseException:
        result = {"ok": False, "error": traceback.format_exc(limit=8)}
    sys.stdout.flush(); sys.stderr.flush()
    print(MARK + json.dumps(result), flush=True)
"""


def test_every_doc_is_listed_every_fence_has_a_language_and_every_skip_a_reason():
    on_disk = {"README.md", *(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))}
    assert on_disk == set(DOC_ORDER), f"add new docs to DOC_ORDER: {sorted(on_disk ^ set(DOC_ORDER))}"
    for name in DOC_ORDER:
        for block in read_blocks(REPO / name):  # raises DocFormatError on a bare fence or a bare skip
            assert block.lang in RUN_LANGUAGES + SHOWN_LANGUAGES, f"{block.where}: unknown language {block.lang!r}"


def test_the_readme_opens_with_the_two_commands_and_ci_runs_them():
    blocks = read_blocks(REPO / "README.md")
    demo, tests = blocks[0].text, blocks[1].text
    assert demo.startswith("python3 -m venv .venv") and demo.endswith(".venv/bin/python scripts/demo.py")
    assert tests.startswith("python3 -m venv .venv") and tests.endswith(".venv/bin/python -m pytest -q")
    ci = (REPO / ".ci" / "run").read_text()
    assert tests in ci and demo.split("&& ")[-1] in ci and "-m docs" in ci


#: Set to a directory to keep the sandbox between runs while editing docs: run once with the README,
#: then ``-k "not README"`` reruns only the docs on the tour's data (``-m docs`` still needed).
SANDBOX_ENV = "AVSCENE_DOCS_SANDBOX"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    kept = os.environ.get(SANDBOX_ENV)
    root = Path(kept) if kept else tmp_path_factory.mktemp("docs-sandbox")
    root.mkdir(parents=True, exist_ok=True)
    for name, target in (("scripts", REPO / "scripts"), (".venv", Path(sys.prefix))):
        if not (root / name).exists():
            (root / name).symlink_to(target)
    return root


@pytest.mark.docs
@pytest.mark.parametrize("name", DOC_ORDER)
def test_blocks_run_as_written(name: str, sandbox: Path):
    blocks = [b for b in read_blocks(REPO / name) if b.runs]
    # The first two README blocks set up a venv and run the demo / the tests: .ci/run runs those.
    if name == "README.md":
        blocks = blocks[2:]
    python = None
    try:
        for block in blocks:
            if block.lang == "bash":
                _run_bash(block, sandbox)
            else:
                python = python or _start_python(sandbox)
                _run_python(python, block)
    finally:
        if python is not None:
            python.stdin.close()
            python.wait(timeout=60)


def _env(sandbox: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), MPLBACKEND="Agg", TQDM_DISABLE="1")
    env["PATH"] = f"{sandbox / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run_bash(block: Block, sandbox: Path) -> None:
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.text], cwd=sandbox, env=_env(sandbox),
                          capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    assert proc.returncode == 0, (f"{block.where}: exit {proc.returncode}\n{block.text}\n--- stdout\n"
                                  f"{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")


_MARK = "@@docs-test-result@@"


def _start_python(sandbox: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _DRIVER, _MARK], cwd=sandbox, env=_env(sandbox), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _run_python(proc: subprocess.Popen, block: Block) -> None:
    proc.stdin.write(json.dumps({"text": block.text, "where": block.where}) + "\n")
    proc.stdin.flush()
    output = []
    for line in proc.stdout:
        if line.startswith(_MARK):
            result = json.loads(line[len(_MARK):])
            assert result["ok"], f"{block.where}:\n{block.text}\n--- output\n{''.join(output)[-3000:]}\n{result['error']}"
            return
        output.append(line)
    raise AssertionError(f"{block.where}: the interpreter died\n{''.join(output)[-3000:]}")


def test_reliability_names_only_tests_that_exist():
    """Every promise in docs/reliability.md names its test; a renamed or deleted test fails here."""
    text = (REPO / "docs" / "reliability.md").read_text()
    missing, current = [], None
    for match in re.finditer(r"`?(tests/[\w/]+\.py|test_[\w]+\.py)?::(\w+)(?:\[[^\]]*\])?`?", text):
        file, name = match.group(1), match.group(2)
        if name == "test":  # the intro's "`file::test`"
            continue
        if file:
            found = [REPO / file] if file.startswith("tests/") else sorted((REPO / "tests").rglob(file))
            current = found[0] if len(found) == 1 and found[0].is_file() else None
            if current is None:
                missing.append(file)
                continue
        if current is None or not re.search(rf"^(async )?def {name}\(", current.read_text(), re.M):
            missing.append(f"{current.relative_to(REPO) if current else '?'}::{name}")
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"
