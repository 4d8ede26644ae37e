"""The viewer's optional dependencies: one line naming the ``[view]`` extra when one is missing.

The web stack (Starlette, uvicorn, Plotly's bundled plotly.min.js) is imported only by the viewer,
so ``featurestore`` itself never needs it.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from featurestore.errors import FeatureStoreError

MODULES = ("starlette", "uvicorn", "plotly")
EXTRA_HINT = "pip install 'avscene[view]'"


class ViewExtraMissing(FeatureStoreError, ImportError):
    """A package of the ``[view]`` extra is not installed (a usage error: exit 2, one line)."""


def require_view_extra() -> None:
    """Import every package the app needs, or raise one `ViewExtraMissing` line naming the extra."""
    for name in MODULES:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ViewExtraMissing(f"featurestore view needs the [view] extra ({name} is not installed): "
                                   f"{EXTRA_HINT}") from err


def plotly_js() -> Path:
    """plotly.min.js as the ``plotly`` Python package ships it: served by the app, never a CDN."""
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise ViewExtraMissing(f"the plotly package at {path.parent.parent} has no package_data/plotly.min.js; "
                               f"reinstall it: {EXTRA_HINT}")
    return path
