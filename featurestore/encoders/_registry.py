"""The encoder registry: a dict of builders keyed by family, a decorator, and plugin discovery.

A builder is anything called as ``builder(spec: EncoderSpec, **options) -> Encoder``; an ``Encoder``
subclass whose ``__init__`` takes ``(spec, **options)`` is one. Other distributions add families
through the entry-point group ``featurestore.encoders`` (name = family, value = the builder, e.g.
``myenc = my_pkg.encoders:MyEncoder``); entry points are read on the first lookup that misses the
built-ins and loaded only when their family is asked for, so a broken plugin cannot break
``import featurestore``.
"""
from __future__ import annotations

import fnmatch
import functools
import inspect
import warnings
from collections.abc import Callable
from importlib import metadata
from types import ModuleType
from typing import Any, TypeVar

import torch

from featurestore._spec import split_name
from featurestore.encoders._encoder import RUN_OPTIONS, Encoder
from featurestore.encoders._names import _FAMILY_RE, EncoderSpec, SpecError, UnknownEncoderError, parse_spec

ENTRY_POINT_GROUP = "featurestore.encoders"

EncoderBuilder = Callable[..., Encoder]
B = TypeVar("B", bound=Callable[..., Any])

_REGISTRY: dict[str, EncoderBuilder] = {}


def register_encoder(family: str) -> Callable[[B], B]:
    """Decorator registering an encoder class (or factory) under ``family``.

    Registering a family twice replaces the first builder with a warning, as timm does, so a plugin
    can deliberately shadow a built-in while an accidental clash is still visible.
    """
    if not isinstance(family, str) or not _FAMILY_RE.match(family):
        raise ValueError(f"encoder family {family!r} must be letters, digits, '_', '.' or '-' (no '/' or '@')")

    def decorate(builder: B) -> B:
        if not callable(builder):
            raise TypeError(f"encoder family {family!r}: {builder!r} is not callable")
        old = _REGISTRY.get(family)
        if old is not None and old is not builder:
            warnings.warn(f"encoder family {family!r} registered twice: {_describe(old)} is replaced by "
                          f"{_describe(builder)}", RuntimeWarning, stacklevel=2)
        _REGISTRY[family] = builder
        return builder

    return decorate


def _describe(builder: Any) -> str:
    return f"{getattr(builder, '__module__', '?')}.{getattr(builder, '__qualname__', repr(builder))}"


@functools.cache
def _entry_points() -> dict[str, metadata.EntryPoint]:
    """The plugin entry points by family name (read once; ``refresh_plugins()`` rereads)."""
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def refresh_plugins() -> None:
    """Forget the entry points read so far, e.g. after installing a plugin in a running session."""
    _entry_points.cache_clear()


def _load_plugin(family: str, entry_point: metadata.EntryPoint) -> EncoderBuilder:
    """Import a plugin's builder and register it under its entry-point name."""
    try:
        obj = entry_point.load()
    except Exception as exc:
        raise ImportError(f"encoder plugin {family!r} ({entry_point.value}) failed to load: "
                          f"{type(exc).__name__}: {exc}") from exc
    if family in _REGISTRY:  # importing the module registered it through the decorator
        return _REGISTRY[family]
    if isinstance(obj, ModuleType) or not callable(obj):
        raise ImportError(f"encoder plugin {family!r} ({entry_point.value}) must point at an encoder class "
                          f"or factory, or at a module that registers {family!r}")
    register_encoder(family)(obj)
    return obj


def get_builder(family: str) -> EncoderBuilder:
    """The builder registered for ``family``, loading a plugin on first use.

    Raises:
        UnknownEncoderError: no built-in and no plugin of that name (the message lists them).
    """
    if family in _REGISTRY:
        return _REGISTRY[family]
    entry_point = _entry_points().get(family)
    if entry_point is not None:
        return _load_plugin(family, entry_point)
    raise UnknownEncoderError("encoder family", family, list_encoders(),
                              hint="Plugins register through the entry-point group 'featurestore.encoders'.")


def list_encoders(pattern: str | None = None, models: bool = False) -> list[str]:
    """Registered encoder families (built-in and plugins), or with ``models=True`` their specs.

    Args:
        pattern: optional ``fnmatch`` filter, e.g. ``"clip*"`` or ``"timm/regnet*"``.
        models: list ``family/model`` for every model a family knows (``known_models()``); this
            imports timm/open_clip and loads plugins, so it is slower than the family list.
    """
    families = sorted(set(_REGISTRY) | set(_entry_points()))
    if models:
        names: list[str] = []
        for family in families:
            known = getattr(get_builder(family), "known_models", lambda: None)()
            if known:
                names.extend(f"{family}/{model}" for model in known)
            else:
                names.append(family)
    else:
        names = families
    return [name for name in names if pattern is None or fnmatch.fnmatchcase(name, pattern)]


def create_encoder(spec: str | EncoderSpec, device: str | torch.device = "cpu", **options: Any) -> Encoder:
    """Build the encoder for ``spec`` and move it to ``device`` (``"auto"``: CUDA when available).

    Args:
        spec: ``[NAME=]family[/model][@weights]``, e.g. ``"clip/ViT-B-32@openai"``, ``"logmel"`` or
            ``"vit_random=clip/ViT-B-32@none"`` (``NAME`` is the feature set it fills; default: the
            spec without its weights).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` or a ``torch.device``.
        **options: family-specific constructor options (e.g. ``n_mels=128`` for ``logmel``), and
            the run options every encoder takes (``precision="bfloat16"``, ``channels_last=True``,
            ``cudnn_benchmark=True``, ``compile=True``: ``Encoder.set_run_options``); they change the encoder's config and therefore its
            provenance fingerprint.

    Raises:
        SpecError (also for an option the family does not take, naming the ones it does),
        UnknownEncoderError, WeightsNotFoundError, WeightsMismatchError.
    """
    name, text = split_name(spec) if isinstance(spec, str) else (None, spec)
    parsed = parse_spec(text)
    builder = get_builder(parsed.family)
    check = getattr(builder, "check_spec", None)
    if check is not None:
        check(parsed)
    run = {key: options[key] for key in RUN_OPTIONS if key in options}
    family_options = {key: value for key, value in options.items() if key not in RUN_OPTIONS}
    check_options(builder, parsed, family_options)
    encoder = builder(parsed, **family_options)
    if not isinstance(encoder, Encoder):
        raise TypeError(f"encoder family {parsed.family!r}: {_describe(builder)} returned "
                        f"{type(encoder).__name__}, not an Encoder")
    if run:
        encoder.set_run_options(**run)
    if name is not None:
        encoder.name = name
    encoder.request = {"spec": str(parsed), "options": dict(options)}
    return encoder.to(device)


def check_options(builder: EncoderBuilder, spec: EncoderSpec, options: dict[str, Any]) -> None:
    """Refuse options the builder's signature does not take, naming those it does.

    A builder that takes ``**kwargs`` checks its own (``logmel`` does, naming its config fields).
    """
    if not options:
        return
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):  # a builtin or C callable: let the call itself complain
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = sorted(n for n, p in list(params.items())[1:]
                   if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY))
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise SpecError(f"encoder {spec}: unknown option(s) {unknown}; {spec.family} takes "
                        f"{', '.join(valid) if valid else 'no options'}")
