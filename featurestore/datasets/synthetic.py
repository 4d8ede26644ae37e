"""Deprecated: the demo dataset generator is :mod:`featurestore.demo` (readers do not know about it).

Importing this module still gives every public name of :mod:`featurestore.demo`, with a
DeprecationWarning.
"""
from __future__ import annotations

import warnings

from featurestore.demo import *  # noqa: F401,F403 - the old import path re-exports the generator
from featurestore.demo import __all__  # noqa: F401

warnings.warn("featurestore.datasets.synthetic is deprecated; import the demo generator from featurestore.demo",
              DeprecationWarning, stacklevel=2)
