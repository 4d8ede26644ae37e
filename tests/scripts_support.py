"""Load a script of ``scripts/`` as a module, for the tests of the benchmarks and recipes."""
from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@contextmanager
def script_module(relative: str) -> Iterator[ModuleType]:
    """``scripts/<relative>`` imported under its file's stem, registered in ``sys.modules`` while
    used (a dataclass defined in it looks its module up there) and removed after."""
    path = SCRIPTS / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
