"""The fenced code blocks of README.md and docs/*.md, read the way tests/test_docs.py runs them.

Every fence carries a language. ``bash`` and ``python`` blocks are instructions a reader will copy,
so they run, in file order, in one sandbox directory; anything else (``text`` for output and layouts,
``json``, ``toml``) is shown, not run. A block that cannot run on the machines the tests run on (it
needs the real TAU dataset, a GPU, a cluster) says so in the line right above its fence:

    <!-- docs-test: skip (needs the real TAU development set) -->

A skip without a reason is an error, so nobody silences a block without saying why.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

RUN_LANGUAGES = ("bash", "python")
SHOWN_LANGUAGES = ("text", "json", "toml", "markdown", "csv", "yaml", "ini")
_FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[A-Za-z0-9_+-]*)\s*$")
_SKIP = re.compile(r"^\s*<!--\s*docs-test:\s*skip\s*(?:\((?P<reason>[^)]*)\))?\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its language, its text and, when skipped, why."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    skip: str | None = None

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.lang in RUN_LANGUAGES and self.skip is None


class DocFormatError(ValueError):
    """A fence without a language, an unclosed fence, or a skip marker without a reason."""


def read_blocks(path: Path) -> list[Block]:
    """Every fenced block of one Markdown file, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, indent, lang = i, len(match["indent"]), match["lang"]
        if not lang:
            raise DocFormatError(f"{path.name}:{i + 1}: a fence without a language; write ```bash or ```python "
                                 f"for what runs, ```text for output")
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise DocFormatError(f"{path.name}:{i + 1}: fence never closed")
        body = "\n".join(line[indent:] for line in lines[start + 1:end])
        blocks.append(Block(path, start + 1, lang, body, _skip_reason(path, lines, start)))
        i = end + 1
    return blocks


def _skip_reason(path: Path, lines: list[str], fence: int) -> str | None:
    above = next((lines[j] for j in range(fence - 1, -1, -1) if lines[j].strip()), "")
    marker = _SKIP.match(above)
    if not marker:
        return None
    reason = (marker["reason"] or "").strip()
    if not reason:
        raise DocFormatError(f"{path.name}:{fence + 1}: a docs-test skip marker must say why: "
                             f"<!-- docs-test: skip (reason) -->")
    return reason
