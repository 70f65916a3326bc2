"""Validate a parsed TOML table or JSON object into a dataclass, once, with errors naming the key.

The dataclass is the schema: each field's type hint gives the accepted type, its default makes it
optional, and :func:`spec` metadata adds ``doc``, ``choices``, ``min``, ``max`` and ``pattern``. The same code
checks the config file (:mod:`device_app.config`) and MQTT request payloads (:mod:`device_app.requests`), so
both report problems the same way: ``<where> <key>: <rule>, got <value>``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def spec(default: Any = dataclasses.MISSING, doc: str = "", **rules: Any) -> Any:
    """A dataclass field with documentation and validation rules.

    Args:
        default: the default value; omit it for a required key. Lists are copied per instance.
        doc: one line for the config reference.
        **rules: ``choices`` (allowed values), ``min``/``max`` (numbers, or list/str length with
            ``min_len``/``max_len``), ``item_min``/``item_max`` (every number in a list), ``pattern`` (regular
            expression a string must match in full).

    Returns:
        A ``dataclasses.field``.
    """
    meta = {"doc": doc, **rules}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_name(hint: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a table"}
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        return f"a list of {_type_name(item).split(' ', 1)[1]}s"
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(hint) if a is not type(None))
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_matches(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is Any:
        return True
    return isinstance(value, hint)


def _wants_float(hint: Any) -> bool:
    """True when ``hint`` is ``float`` or ``float | None``: integers given for it become floats."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (types.UnionType, typing.Union) else (hint,)
    return float in args and int not in args


def _rule_problem(value: Any, meta: dict[str, Any]) -> str | None:
    """The rule a well-typed value breaks, or ``None``."""
    choices = meta.get("choices")
    if choices is not None and value is not None and value not in choices:
        return f"must be one of {list(choices)}"
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "min" in meta and value < meta["min"]:
            return f"must be >= {meta['min']}"
        if "max" in meta and value > meta["max"]:
            return f"must be <= {meta['max']}"
    if isinstance(value, str | list):
        if "min_len" in meta and len(value) < meta["min_len"]:
            return f"must have at least {meta['min_len']} item(s)/character(s)"
        if "max_len" in meta and len(value) > meta["max_len"]:
            return f"must have at most {meta['max_len']} item(s)/character(s)"
    if isinstance(value, list):
        low, high = meta.get("item_min"), meta.get("item_max")
        bad = [v for v in value if (low is not None and v < low) or (high is not None and v > high)]
        if bad:
            return f"every item must be between {low} and {high}, {len(bad)} are not (first {_short(bad[0])})"
    pattern = meta.get("pattern")
    if pattern and isinstance(value, str) and not re.fullmatch(pattern, value):
        return f"must match {pattern}"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def collect(cls: type[T], data: Any, where: str) -> tuple[T | None, list[str]]:
    """Check ``data`` against dataclass ``cls`` and build it, collecting every problem.

    Args:
        cls: a dataclass whose fields are the allowed keys.
        data: the parsed table (anything: a non-dict is a problem).
        where: prefix for messages, e.g. ``"[mqtt]"`` or ``"request train:"``.

    Returns:
        ``(instance, [])`` when valid, else ``(None, problems)``.
    """
    if not isinstance(data, dict):
        return None, [f"{where} must be a table/object, got {type(data).__name__}"]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    problems = [
        f"{where} unknown key {key!r}; allowed: {sorted(fields)}" for key in data if key not in fields
    ]
    values: dict[str, Any] = {}
    for name, fld in fields.items():
        if name not in data:
            if fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
                problems.append(f"{where} {name}: is required ({fld.metadata.get('doc', '')})".rstrip(" ()"))
            continue
        value = data[name]
        hint = hints[name]
        if not _matches(value, hint):
            problems.append(f"{where} {name}: must be {_type_name(hint)}, got {_short(value)}")
            continue
        if _wants_float(hint) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        rule = _rule_problem(value, fld.metadata)
        if rule:
            problems.append(f"{where} {name}: {rule}, got {_short(value)}")
            continue
        values[name] = value
    if problems:
        return None, problems
    return cls(**values), []


def describe(cls: type) -> list[tuple[str, str, str, str]]:
    """``(key, type, default, doc)`` rows for documentation and ``check-config --explain``."""
    hints = typing.get_type_hints(cls)
    rows = []
    for fld in dataclasses.fields(cls):
        if not fld.init:
            continue
        if fld.default is not dataclasses.MISSING:
            default = repr(fld.default)
        elif fld.default_factory is not dataclasses.MISSING:
            default = repr(fld.default_factory())
        else:
            default = "required"
        rows.append((fld.name, _type_name(hints[fld.name]), default, fld.metadata.get("doc", "")))
    return rows
