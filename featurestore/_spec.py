"""The encoder spec grammar ``[NAME=]family[/model][@weights]``, kept free of torch.

It lives outside ``featurestore.encoders`` (whose import builds the registry and pulls in torch,
timm and open_clip) so that the extraction planner can read a request, compare it with what a store
holds and find that nothing is left to do in a fraction of a second. ``featurestore.encoders``
re-exports ``EncoderSpec``, ``parse_spec`` and ``SpecError``; plugin authors use those names.

``NAME=`` is optional and names the feature set the encoder fills (default: the spec without its
weights, ``clip/ViT-B-32``), so that two weight choices of one encoder can live side by side in one
store: ``vit_random=clip/ViT-B-32@none``. The name is cut at the first ``=`` that comes before any
``@`` (a checkpoint path after ``@`` may hold ``=``); family names never contain ``=``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Any

from featurestore.errors import FeatureStoreError

FAMILY_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_OPTION_RE = re.compile(r"^(?P<target>.+?)\.(?P<key>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>.*)$", re.DOTALL)


class SpecError(FeatureStoreError, ValueError):
    """An encoder spec string or an encoder option is malformed."""


@dataclass(frozen=True)
class EncoderSpec:
    """A parsed encoder spec ``family[/model][@weights]``.

    Attributes:
        family: registry key (``clip``, ``timm``, ``logmel``, or a plugin's name).
        model: the family's model name (``ViT-B-32``, ``regnety_064``), None for model-less families.
        weights: a pretrained tag, ``none`` (random), a checkpoint path, or None for the family default.
    """

    family: str
    model: str | None = None
    weights: str | None = None

    @property
    def name(self) -> str:
        """The default feature-set name in the store: the spec without its weights."""
        return self.family if self.model is None else f"{self.family}/{self.model}"

    def with_weights(self, weights: str | None) -> EncoderSpec:
        """The same spec with other weights (used to record the resolved default)."""
        return replace(self, weights=weights)

    def __str__(self) -> str:
        return self.name if self.weights is None else f"{self.name}@{self.weights}"


def parse_spec(spec: str | EncoderSpec) -> EncoderSpec:
    """Parse ``family[/model][@weights]``; the weights part is everything after the first ``@``.

    Splitting at the first ``@`` lets checkpoint paths contain ``@`` and ``/``; model names never
    contain ``@``. Examples: ``logmel``, ``timm/regnety_064``, ``clip/ViT-B-32@none``,
    ``clip/RN101@/ckpt/rn101.pt``. A ``NAME=`` prefix is not part of the spec: see `split_name`.

    Raises:
        SpecError: empty parts or a family name with characters other than letters, digits, ``_.-``.
    """
    if isinstance(spec, EncoderSpec):
        return spec
    if not isinstance(spec, str):
        raise SpecError(f"encoder spec must be a string like 'clip/ViT-B-32@openai', got {type(spec).__name__}")
    text = spec.strip()
    head, at, weights = text.partition("@")
    family, slash, model = head.partition("/")
    if "=" in family:
        raise SpecError(f"encoder spec {spec!r}: a feature-set name goes before the spec as 'NAME=SPEC' "
                        f"(e.g. 'vit_random=clip/ViT-B-32@none'), not inside it")
    if not family or not FAMILY_RE.match(family):
        raise SpecError(f"encoder spec {spec!r}: family {family!r} must be letters, digits, '_', '.' or '-' "
                        f"(expected '[NAME=]family[/model][@weights]')")
    if slash and not model:
        raise SpecError(f"encoder spec {spec!r}: empty model name after '/'")
    if at and not weights:
        raise SpecError(f"encoder spec {spec!r}: empty weights after '@' (use a tag, 'none' or a checkpoint path)")
    return EncoderSpec(family=family, model=model or None, weights=weights or None)


def split_name(text: str) -> tuple[str | None, str]:
    """``"NAME=SPEC"`` -> ``(NAME, SPEC)``; a plain spec -> ``(None, SPEC)``.

    The name is checked like every feature-set name (letters, digits, ``_.+@-``, '/' between
    parts); the spec is returned as written (``parse_spec`` checks it).

    Raises:
        SpecError: an empty name or spec, or a name the store could not hold.
    """
    if not isinstance(text, str):
        raise SpecError(f"encoder spec must be a string like 'clip/ViT-B-32@openai', got {type(text).__name__}")
    stripped = text.strip()
    eq, at = stripped.find("="), stripped.find("@")
    if eq < 0 or (0 <= at < eq):
        return None, stripped
    name, spec = stripped[:eq].strip(), stripped[eq + 1:].strip()
    if not name or not spec:
        raise SpecError(f"encoder {text!r}: expected NAME=SPEC with both parts, e.g. 'vit_random=clip/ViT-B-32@none'")
    return check_feature_set_name(name, text), spec


def check_feature_set_name(name: str, given: str | None = None) -> str:
    """``name`` when a store can hold a feature set of that name, else a SpecError naming it."""
    from featurestore.store.layout import validate_name

    try:
        return validate_name("feature set", name)
    except ValueError as err:
        raise SpecError(f"encoder {given or name!r}: {err}") from None


def parse_option(text: str) -> tuple[str, str, Any]:
    """``"SPEC_OR_NAME.key=value"`` -> ``(SPEC_OR_NAME, key, value)``, as ``--encoder-option`` takes it.

    The value is a JSON literal when it parses as one (``128``, ``0.5``, ``null``, ``true``,
    ``[1, 2]``, ``"text"``), else the string as written (``bicubic``). The encoder part may hold
    dots (``timm/regnety_064.pycls_in1k.drop_rate=0.1``): the key is the first identifier that is
    followed by ``=``.

    Raises:
        SpecError: not of that form.
    """
    match = _OPTION_RE.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise SpecError(f"encoder option {text!r}: expected SPEC_OR_NAME.key=value, e.g. logmel.n_mels=128")
    return match["target"], match["key"], _literal(match["value"])


def _literal(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value
