"""``featurestore view``: a local web app over a store (embedding map, clip pages, search, confusion).

The package imports nothing of the web stack until the app starts, so ``import featurestore`` stays
light; without the ``[view]`` extra, starting it is one line naming the extra (`require_view_extra`).
See docs/view.md.
"""
from featurestore.viewer._deps import ViewExtraMissing, require_view_extra
from featurestore.viewer.serve import Running, prepare, start, view

__all__ = ["Running", "ViewExtraMissing", "prepare", "require_view_extra", "start", "view"]
