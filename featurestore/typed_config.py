"""Typed config dataclasses: pydantic checks every field's type and range, errors are one line.

Recipes and configs (``heads.TrainConfig``, the heads' configs, ``fusion.FusionRecipe``) are plain
dataclasses to their callers (``dataclasses.fields``/``asdict``/``replace`` work), made by
`typed_config`, which turns them into pydantic dataclasses with ``extra="forbid", strict=True``: a
JSON file holding ``"margin": "0.2"`` or ``"epochs": "five"`` is refused when it is loaded, not deep
inside training. Strict is right for files and Python callers; a command-line string is parsed into
the field's type by `parse_field` (``--set l2_normalize=true``, never "maybe").

Why wrap ``__init__`` and ``__setattr__``: pydantic's `ValidationError` is a ValueError whose text is
several lines with URLs; the command lines print an error as one line, so every construction and
assignment raises the package's own ValueError subclass with `describe`'s one-line text instead.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import typing
from collections import defaultdict
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

STRICT = ConfigDict(extra="forbid", strict=True, validate_assignment=True)
_JSON_TYPES = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "an array",
               dict: "an object", type(None): "null"}
_SHOWN = 3  # problems named in one message; the rest are counted
T = TypeVar("T")


def typed_config(error: type[ValueError]) -> Callable[[type[T]], type[T]]:
    """Class decorator: a strict pydantic dataclass whose bad values raise ``error`` (one line)."""

    def make(cls: type[T]) -> type[T]:
        typed = pydantic_dataclass(cls, config=STRICT)
        init, setattr_ = typed.__init__, typed.__setattr__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                init(self, *args, **kwargs)
            except ValidationError as err:
                raise error(f"{typed.__name__}: {describe(err, typed)}") from None

        @functools.wraps(setattr_)
        def __setattr__(self: Any, name: str, value: Any) -> None:
            try:
                setattr_(self, name, value)
            except ValidationError as err:
                raise error(f"{typed.__name__}: {describe(err, typed)}") from None

        typed.__init__, typed.__setattr__ = __init__, __setattr__
        return typed

    return make


def load_json(cls: type[T], text: str, source: str, error: type[ValueError], at: tuple = ()) -> T:
    """``cls`` from JSON text, strictly (JSON types only: ``"0.2"`` is not a number).

    Errors start with ``source`` (the file; "" for none) and name keys as dotted paths under ``at``.
    A key given twice in one object is refused (`repeated_keys`).
    """
    head = f"{source}: " if source else ""
    repeated = repeated_keys(text, at)
    if repeated:
        raise error(f"{head}key(s) {', '.join(map(repr, repeated))} given more than once; JSON keeps only the last "
                    f"value, which would drop the others without a word: merge them or rename one")
    try:
        return _adapter(cls).validate_json(text, strict=True)
    except ValidationError as err:
        raise error(head + describe(err, cls, at)) from None


class _Pairs(list):
    """A JSON object as its (key, value) pairs in file order, before a repeated key is merged away."""


def repeated_keys(text: str, at: tuple = ()) -> list[str]:
    """Dotted paths (under ``at``) of the keys that appear twice in one object of the JSON ``text``
    ([] for text that is not JSON: the validation says what is wrong with it).

    Why: ``{"V04": ["V01", "V02"], "V04": ["C04"]}`` (a copied line not renamed) is valid JSON that
    every parser, pydantic's included, reads as ``{"V04": ["C04"]}``: a family's runs, a rule, a
    head-config field or a whole section would vanish and nothing would say so.
    """
    try:
        node = json.loads(text, object_pairs_hook=_Pairs)
    except ValueError:
        return []
    return _repeated(node, tuple(str(a) for a in at))


def _repeated(node: Any, at: tuple[str, ...]) -> list[str]:
    found: list[str] = []
    if isinstance(node, _Pairs):
        seen: set[str] = set()
        for key, value in node:
            path = ".".join((*at, key))
            if key in seen and path not in found:
                found.append(path)
            seen.add(key)
            found += [p for p in _repeated(value, (*at, key)) if p not in found]
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _repeated(value, (*at, str(i)))
    return found


def load_data(cls: type[T], data: dict, source: str, error: type[ValueError], at: tuple = ()) -> T:
    """``cls`` from already-parsed JSON data (a dict), as strictly as `load_json`."""
    try:
        text = json.dumps(data)
    except (TypeError, ValueError) as err:
        raise error(f"{source or _path(at)}: not JSON data ({err})") from None
    return load_json(cls, text, source, error, at)


def parse_field(cls: type, name: str, raw: str) -> Any:
    """A command-line string parsed into field ``name`` of ``cls``'s type (``"true"`` -> True, ``"[8]"`` -> [8]).

    JSON first (numbers, booleans, lists, null), then the string itself (a backbone name); the value
    is then checked like any other (``--set l2_normalize=maybe`` is refused). Raises ValueError.
    """
    field_type = _field_types(cls)[name]
    adapter = TypeAdapter(field_type)
    with contextlib.suppress(ValidationError):  # not JSON of that type: try the text itself
        return adapter.validate_json(raw, strict=False)
    try:
        return adapter.validate_python(raw, strict=False)
    except ValidationError as err:
        problem = err.errors(include_url=False)[0]
        raise ValueError(f"{name}: expected {_expected(problem)}, got {raw!r}") from None


def field_names(cls: type) -> list[str]:
    """The field names of a config dataclass, sorted (what an unknown key is told it could have been)."""
    return sorted(f.name for f in dataclasses.fields(cls))


def describe(err: ValidationError, cls: type, at: tuple = ()) -> str:
    """One line for a pydantic error: each bad key as a dotted path (under ``at``), its value and what was expected."""
    problems: list[str] = []
    unknown: dict[tuple, list[str]] = defaultdict(list)
    missing: dict[tuple, list[str]] = defaultdict(list)
    for problem in err.errors(include_url=False):
        loc = tuple(at) + tuple(problem["loc"])
        if problem["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            unknown[loc[:-1]].append(str(loc[-1]))
        elif problem["type"] == "missing":
            missing[loc[:-1]].append(str(loc[-1]))
        else:
            problems.append(_one(problem, loc))
    for parent, keys in unknown.items():
        allowed = _allowed_keys(cls, parent[len(at):])
        problems.append(f"{_where(parent)}unknown key(s) {sorted(keys)}; allowed keys are {allowed}")
    for parent, keys in missing.items():
        problems.append(f"{_where(parent)}missing required key(s) {sorted(keys)}")
    more = f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
    return "; ".join(problems[:_SHOWN]) + more


def _one(problem: dict, loc: tuple) -> str:
    cause = (problem.get("ctx") or {}).get("error")
    if problem["type"] == "value_error" and isinstance(cause, Exception):
        # our own checks (__post_init__, validators) already say what was expected and found
        text = str(cause)
        return text if text.startswith(_path(loc)) else f"{_where(loc)}{text}"
    value = problem.get("input")
    return f"{_path(loc)}: expected {_expected(problem)}, got {_show(value)}"


_BOUNDS = {"greater_than_equal": ">= {ge}", "greater_than": "> {gt}", "less_than_equal": "<= {le}",
           "less_than": "< {lt}", "too_short": "at least {min_length} item(s)", "too_long": "at most {max_length} item(s)",
           "string_too_short": "a string of at least {min_length} character(s)", "finite_number": "a finite number"}


def _expected(problem: dict) -> str:
    """What the field wanted, in words: pydantic's message without its 'Input should be'."""
    bound = _BOUNDS.get(problem["type"])
    if bound is not None:
        ctx = {k: f"{v:g}" if isinstance(v, float) else v for k, v in (problem.get("ctx") or {}).items()}
        return bound.format(**ctx)
    msg = problem["msg"]
    for prefix in ("Input should be ", "Value should be "):
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg[:1].lower() + msg[1:]


def _show(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    kind = _JSON_TYPES.get(type(value))
    return f"{text} ({kind})" if kind else text


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _where(loc: tuple) -> str:
    return f"{_path(loc)}: " if loc else ""


def _allowed_keys(cls: type, parent: tuple) -> list[str]:
    """The field names of the dataclass at ``parent`` inside ``cls`` (nested config sections)."""
    for part in parent:
        cls = _dataclass_in(_field_types(cls).get(str(part)))
        if cls is None:
            return []
    return field_names(cls)


def _field_types(cls: type) -> dict[str, Any]:
    fields = getattr(cls, "__pydantic_fields__", None)
    if fields is None:
        return typing.get_type_hints(cls, include_extras=True)
    return {name: info.rebuild_annotation() for name, info in fields.items()}


def _dataclass_in(annotation: Any) -> type | None:
    """The dataclass in ``X``, ``X | None`` or ``Annotated[X, ...]``, else None."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    for arg in typing.get_args(annotation):
        found = _dataclass_in(arg)
        if found is not None:
            return found
    return None


@functools.lru_cache(maxsize=None)
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)
