"""The viewer's optional dependencies: one line naming the ``[view]`` extra when one is missing.

The web stack (Starlette, uvicorn, Plotly's bundled plotly.min.js) is imported only by the viewer,
so ``featurestore`` itself never needs it.
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from featurestore.errors import FeatureStoreError

MODULES = ("starlette", "uvicorn", "plotly")
EXTRA_HINT = "pip install 'avscene[view]'"


class ViewExtraMissing(FeatureStoreError, ImportError):
    """A package of the ``[view]`` extra is not installed (a usage error: exit 2, one line)."""


def require_view_extra() -> None:
    """Import every package the app runs on, or raise one `ViewExtraMissing` line naming the extra.
    ``plotly`` is only found, not imported: the app serves its plotly.min.js file and needs none of
    its Python (importing it would cost the idle app ~5 MiB)."""
    for name in MODULES:
        try:
            _plotly_dir() if name == "plotly" else importlib.import_module(name)
        except ImportError as err:
            raise ViewExtraMissing(f"featurestore view needs the [view] extra ({name} is not installed): "
                                   f"{EXTRA_HINT}") from err


def _plotly_dir() -> Path:
    """The installed ``plotly`` package's folder, found without importing it (ImportError when absent)."""
    try:
        spec = importlib.util.find_spec("plotly")
    except (ImportError, ValueError) as err:  # ValueError: sys.modules["plotly"] is None
        raise ImportError("plotly") from err
    if spec is None or not spec.origin:
        raise ImportError("plotly")
    return Path(spec.origin).parent


def plotly_js() -> Path:
    """plotly.min.js as the ``plotly`` Python package ships it: served by the app, never a CDN."""
    path = _plotly_dir() / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise ViewExtraMissing(f"the plotly package at {path.parent.parent} has no package_data/plotly.min.js; "
                               f"reinstall it: {EXTRA_HINT}")
    return path
