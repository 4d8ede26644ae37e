"""The words of encoder specs and of the registry: modalities, the spec grammar, unknown names.

The spec grammar (``EncoderSpec``, ``parse_spec``, ``SpecError``) lives in ``featurestore._spec``,
which imports no torch; it is re-exported here and from ``featurestore.encoders``. Nothing here
imports torch either.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable

from featurestore._spec import FAMILY_RE, EncoderSpec, SpecError, parse_spec  # noqa: F401 - re-exported
from featurestore.errors import FeatureStoreError

#: What an encoder's input is: 1 s audio segments, RGB video frames or text prompts.
MODALITIES = ("audio", "video", "text")
_FAMILY_RE = FAMILY_RE


class UnknownEncoderError(FeatureStoreError, KeyError):
    """An encoder family or model is not known; the message lists the nearest known names."""

    def __init__(self, what: str, name: str, known: Iterable[str], hint: str = ""):
        self.name = name
        known = sorted(set(known))
        near = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        listing = ", ".join(known) if len(known) <= 30 else f"{len(known)} names"
        message = f"unknown {what} {name!r}; known: {listing or '(none)'}."
        if near:
            message += f" Did you mean {', '.join(near)}?"
        if hint:
            message += f" {hint}"
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.args[0]
