"""``fusion submit``: run a recipe on a split (labels not needed) and write the DCASE CSV."""
from __future__ import annotations

from pathlib import Path

from fusion.pipeline import fuse
from fusion.recipe import FusionRecipe
from fusion.submission import DEFAULT_FILENAME_TEMPLATE, check_filename_template, check_output_file, write_submission


def submit_recipe(store, recipe: FusionRecipe, split: str | None, out: str | Path,
                  filename_template: str = DEFAULT_FILENAME_TEMPLATE) -> tuple[Path, int]:
    """Fuse ``split`` with ``recipe`` and write its final probabilities as a submission file.

    An ``out`` that is a directory or lies in the store, or a filename template with a field other than ``{clip_id}``, is
    refused before the recipe runs; probabilities that come out
    NaN or infinite are refused (``NonFiniteProbabilitiesError``) and nothing is written.

    Returns:
        (path written, number of clips).
    """
    check_output_file(out, store)
    check_filename_template(filename_template)
    output = fuse(store, recipe, split)
    path = write_submission(out, output.clip_ids, output.final, output.classes, filename_template)
    return path, len(output.clip_ids)
