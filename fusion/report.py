"""``fusion report``: a directory with report.md (a Table 2 of the paper's shape), PNGs and JSON.

Random encoder weights are flagged three times on purpose: a banner at the top of report.md, the
word RANDOM in the notes of every affected row of the table, and the weights-identity table.
"""
from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featurestore.atomic_files import atomic_path
from fusion.evaluate import EQ1, FUSED, Evaluation, describe_calibration, evaluate_recipe
from fusion.metrics import Scores, reliability
from fusion.plots import confusion_png, reliability_png
from fusion.recipe import FusionRecipe
from fusion.runinfo import RunInfo, describe_runs, feature_modality
from fusion.submission import check_outside_store

RANDOM_BANNER = (
    "> **WARNING: RANDOM WEIGHTS.** At least one encoder behind these predictions ran with randomly "
    "initialised weights (no pretrained checkpoint was available). The numbers below test the "
    "pipeline, not the paper's method: {features}."
)


@dataclass
class TableRow:
    """One row of the Table-2-shaped summary."""

    index: str
    architecture: str
    audio: str
    video: str
    notes: str
    scores: Scores


@dataclass
class Report:
    """Paths written by :func:`write_report` and the evaluation behind them."""

    directory: Path
    markdown: Path
    confusion_png: Path
    reliability_png: Path
    metrics_json: Path
    evaluation: Evaluation
    rows: list[TableRow]


def _random_note(features: list[str]) -> str:
    return f"RANDOM weights ({', '.join(features)})" if features else ""


def _join_notes(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _run_rows(ev: Evaluation, infos: dict[str, RunInfo]) -> list[TableRow]:
    rows = []
    for run, scores in ev.runs.items():
        info = infos[run]
        trained = f"trained on {info.train_split}" if info.train_split else ""
        rows.append(TableRow(run, info.architecture, ", ".join(info.audio_inputs) or "-",
                             ", ".join(info.video_inputs) or "-",
                             _join_notes(_random_note(info.random_features), trained), scores))
    return rows


def _members(runs: list[str], infos: dict[str, RunInfo]) -> tuple[str, str, list[str]]:
    audio = sorted({f for r in runs for f in infos[r].audio_inputs})
    video = sorted({f for r in runs for f in infos[r].video_inputs})
    random = sorted({f for r in runs for f in infos[r].random_features})
    return ", ".join(audio) or "-", ", ".join(video) or "-", random


def _family_rows(ev: Evaluation, infos: dict[str, RunInfo]) -> list[TableRow]:
    rows = []
    for family, runs in ev.output.recipe.families.items():
        if runs == [family]:
            continue  # a one-run family named like its run is already a run row
        audio, video, random = _members(runs, infos)
        rows.append(TableRow(family, f"{', '.join(runs)}'s models", audio, video,
                             _join_notes(f"Ensemble of {', '.join(runs)} (equal weights)", _random_note(random)),
                             ev.families[family]))
    return rows


def _rule_notes(ev: Evaluation) -> str:
    recipe, out = ev.output.recipe, ev.output
    notes = []
    if recipe.replacement:
        counts = ", ".join(f"{t}: {int(m.sum())}" for t, m in out.stage.replaced.items())
        notes.append(f"replacement by {recipe.replacement.source} at margin {recipe.replacement.margin} ({counts} clips)")
    if recipe.class_weights and recipe.class_weights.select:
        notes.append("class selection " + "; ".join(f"{f}: {'/'.join(c)}" for f, c in recipe.class_weights.select.items()))
    if recipe.class_weights and recipe.class_weights.confidence_fit_split:
        notes.append(f"class-wise confidence weights fitted on {recipe.class_weights.confidence_fit_split}")
    return _join_notes(*notes) or "equal-weight mean of the families"


def _fused_rows(ev: Evaluation, infos: dict[str, RunInfo]) -> list[TableRow]:
    recipe = ev.output.recipe
    audio, video, random = _members(recipe.runs, infos)
    arch = "/".join(recipe.families) + "'s models"
    base = _rule_notes(ev)
    extra = {FUSED: "no post-processing", EQ1: "post-processing of equation (1)", **ev.variant_notes}
    rows = []
    for name, scores in ev.variants.items():
        mark = "**recipe output**" if name == ev.final_variant else ""
        rows.append(TableRow(f"{recipe.name}: {name}", arch, audio, video,
                             _join_notes(base, extra.get(name, ""), _random_note(random), mark), scores))
    if ev.final_variant is None:
        rows.append(TableRow(f"{recipe.name}: recipe output", arch, audio, video,
                             _join_notes(base, _final_description(ev), _random_note(random)), ev.final))
    return rows


def _final_description(ev: Evaluation) -> str:
    recipe, parts = ev.output.recipe, []
    if ev.output.calibration:
        parts.append(describe_calibration(ev.output.calibration))
    if recipe.postprocess:
        parts.append("equation (1)")
    return " then ".join(parts)


def table_rows(ev: Evaluation, infos: dict[str, RunInfo]) -> list[TableRow]:
    """Rows in the paper's order: single models, family ensembles, fused variants."""
    return _run_rows(ev, infos) + _family_rows(ev, infos) + _fused_rows(ev, infos)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


_HTML = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;"})


def _inline(text: object) -> str:
    """A name as Markdown text on one line: its own line breaks would end a list item, a heading or a
    table row, and HTML in it (``<b>``) would be rendered instead of shown."""
    return " ".join(str(text).translate(_HTML).splitlines())


def _cell(text: object) -> str:
    """A value as one Markdown table cell. Names come from the store and the recipe (a class name may
    hold any character): an unescaped ``|`` splits the cell and shifts every number after it into the
    wrong column, and a line break ends the table. Backslashes are doubled first: a name holding
    ``\\|`` would otherwise become ``\\\\|``, an escaped backslash followed by a column break."""
    return _inline(str(text).replace("\\", "\\\\").replace("|", "\\|"))


def _row(cells: list[object]) -> str:
    """One Markdown table row of escaped cells."""
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _code(text: object) -> str:
    """``text`` (a path, a split name) on one line as an inline code span, fenced by more backticks
    than it holds in a row, so that a backtick in it cannot end the span early."""
    text = " ".join(str(text).splitlines())
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _table2(rows: list[TableRow]) -> list[str]:
    lines = ["| Index | Architecture | Audio | Video | Notes | Log-loss | Accuracy (%) | Micro log-loss | ECE |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r.scores
        lines.append(_row([r.index, r.architecture, r.audio, r.video, r.notes or "-", _fmt(s.logloss),
                           _fmt(100 * s.accuracy, 1), _fmt(s.logloss_micro), _fmt(s.ece)]))
    return lines


def _classwise_table(ev: Evaluation) -> list[str]:
    names = list(ev.variants)
    counts = np.bincount(ev.output.labels, minlength=len(ev.output.classes))
    lines = [_row(["Class", "Clips", *(f"log-loss: {n}" for n in names), "Accuracy (final)"]),
             "|---|---|" + "---|" * len(names) + "---|"]
    for c, name in enumerate(ev.output.classes):
        cells = [_fmt(ev.variants[n].classwise_logloss[name]) for n in names]
        lines.append(_row([name, counts[c], *cells, _fmt(100 * ev.final.classwise_accuracy[name], 1)]))
    return lines


def _weights_table(stored: dict, infos: dict[str, RunInfo]) -> list[str]:
    used: dict[str, list[str]] = {}
    identity: dict[str, str] = {}
    random: set[str] = set()
    for info in infos.values():
        for feature, ident in info.weights.items():
            used.setdefault(feature, []).append(info.run)
            identity[feature] = ident
        random.update(info.random_features)
    lines = ["| Feature set | Modality | Weights identity | Random weights | Fingerprint | Used by |",
             "|---|---|---|---|---|---|"]
    for feature in sorted(used):
        info = stored.get(feature)
        backbone = feature.startswith("backbone:")
        modality = "head backbone" if backbone else feature_modality(feature, info.provenance if info else None)
        flag = "**RANDOM**" if feature in random else "no"
        fingerprint = info.fingerprint if info else ("-" if backbone else "(not in this store)")
        lines.append(_row([feature, modality, identity[feature], flag, fingerprint, ", ".join(used[feature])]))
    return lines


def render_markdown(store, ev: Evaluation, rows: list[TableRow], infos: dict[str, RunInfo],
                    images: dict[str, str], feature_sets: dict) -> str:
    """The text of report.md (``feature_sets``: the store's, as read once by :func:`write_report`)."""
    out, recipe = ev.output, ev.output.recipe
    random = sorted({f for i in infos.values() for f in i.random_features})
    lines = [RANDOM_BANNER.format(features=_inline(", ".join(random))), ""] if random else []
    lines += [f"# Fusion report: {_inline(recipe.name)}", "",
              f"- Store: {_code(getattr(store, 'location', store))}",
              f"- Evaluated split: {_code(out.split)} ({len(out.clip_ids)} clips)",
              f"- Recipe: {_inline(recipe.description or recipe.name)}",
              f"- Final output: class-wise log-loss **{ev.final.logloss:.3f}**, accuracy **{100 * ev.final.accuracy:.1f} %**",
              "- Log-loss is DCASE's class-wise average (per true class, then the mean); micro log-loss is over all clips. "
              + ("Rows are renormalised to sum to one before scoring, as the 2021 scorer (scikit-learn of that time) did; "
                 "equation (1) leaves rows that do not sum to one."
                 if recipe.metric_renormalize else "Rows are scored as they are (no renormalisation), as scikit-learn >= 1.5 does."),
              ""]
    lines += [f"- Note: {_inline(n)}" for n in out.notes]
    lines += ["", "## Models and ensembles (shape of the paper's Table 2)", "", *_table2(rows), "",
              "## Class-wise results", "", *_classwise_table(ev), "",
              "## Encoder weights", "", *_weights_table(feature_sets, infos), "",
              "## Figures", "",
              f"![Confusion matrix of the recipe output]({images['confusion']})", "",
              f"![Reliability diagram]({images['reliability']})", "",
              "## Recipe", "", "```json", recipe.to_json().rstrip(), "```", ""]
    return "\n".join(lines)


def write_report(store, recipe: FusionRecipe, out_dir: str | Path, split: str | None = None,
                 calibration_split: str | None = None, cross_fit: int | None = None) -> Report:
    """Evaluate ``recipe`` and write report.md, confusion.png, reliability.png and metrics.json.

    The four files are published together: each is written to a temp name, and only when all four
    are written are they renamed onto their names. A full disk part way leaves the previous report
    as it was (``OutputWriteError`` naming the file that failed) and no temp file.

    Args:
        store: an open store with the recipe's prediction runs.
        recipe: the fusion recipe.
        out_dir: directory to create (existing report files there are replaced; a file there, the
            store itself or a folder inside it is refused).
        split: labelled split to score (default: the recipe's ``eval_split``).
        calibration_split: fit split for the temperature/stacking comparison rows.
        cross_fit: location folds for those rows when their fit split overlaps ``split``.
    """
    directory = Path(out_dir)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"report directory {str(directory)!r} is a file; expected a directory (or a new name)")
    check_outside_store(directory, store, "report directory")
    ev = evaluate_recipe(store, recipe, split, calibration_split, cross_fit)
    stored = store.feature_sets()  # reads every done mask: once per report
    infos = describe_runs(store, recipe.runs, stored)
    rows = table_rows(ev, infos)
    out = ev.output
    names = {"markdown": directory / "report.md", "metrics": directory / "metrics.json",
             "confusion": directory / "confusion.png", "reliability": directory / "reliability.png"}
    markdown = render_markdown(store, ev, rows, infos, {k: names[k].name for k in ("confusion", "reliability")},
                               stored)
    payload = {**ev.to_dict(), "weights": {r: {"identity": i.weights, "random": i.random_features}
                                           for r, i in infos.items()}}
    curves = {name: reliability(p, out.labels, renormalize=recipe.metric_renormalize)
              for name, p in ev.variant_probs.items()}
    title = f"{recipe.name} on {out.split}"
    publish_together({names["markdown"]: markdown.encode(),
                      names["metrics"]: (json.dumps(payload, indent=2) + "\n").encode(),
                      names["confusion"]: confusion_png(np.asarray(ev.final.confusion), out.classes, title),
                      names["reliability"]: reliability_png(curves, title)})
    return Report(directory, names["markdown"], names["confusion"], names["reliability"], names["metrics"], ev, rows)


def publish_together(files: dict[Path, bytes]) -> None:
    """Write every file to a temp name beside it, then rename them all: a report is never half new.

    A failed write (full disk) removes every temp file and renames none, so the previous files stay
    as they were; ``OutputWriteError`` names the file that failed.
    """
    for parent in {path.parent for path in files}:
        parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as publish:  # the renames happen as the stack closes, after every write
        for path, data in files.items():
            publish.enter_context(atomic_path(path)).write_bytes(data)
