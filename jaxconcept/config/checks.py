"""Declared constraints: the field types configs use and the one checker that reads them.

A config section is a frozen pydantic dataclass (``section``): every field declares its type,
bounds and choices (``PosInt``, ``Annotated[Real, Field(gt=0, le=0.8)]``, ``Literal[...]``),
pydantic checks them strictly (no ``true`` for an integer, no ``1.5`` for an integer, no NaN or
infinity, integers stay integers), and a failure becomes one ``ConfigError`` line naming the
dotted field and, in words read from the same declaration, what is allowed. Sections stay
hashable (jit static arguments, cache keys) and work with ``dataclasses.replace`` and ``asdict``.
"""
from __future__ import annotations

import functools
from typing import Annotated, Literal, get_args, get_origin

import pydantic
from pydantic import AfterValidator, Field
from pydantic.fields import FieldInfo


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and what is allowed."""


# --------------------------------------------------------------------------------------------
# Field types
# --------------------------------------------------------------------------------------------
Real = int | float  # a finite number; an integer stays an integer (as it was written)
PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
Positive = Annotated[Real, Field(gt=0)]
NonNeg = Annotated[Real, Field(ge=0)]
Fraction = Annotated[Real, Field(ge=0, lt=1)]  # [0, 1)


def rule(test, words: str) -> AfterValidator:
    """A one-field rule that bounds and choices cannot say: ``test(value)`` must hold, and
    ``words`` (e.g. "distinct") join the field's description in error messages."""
    def check(value):
        if not test(value):
            raise ValueError(words)
        return value
    check.words = words
    return AfterValidator(check)


Distinct = rule(lambda v: len(set(v)) == len(v), "distinct")
Increasing = rule(lambda v: list(v) == sorted(set(v)), "increasing")

_NOUNS = {int: ("an integer", "integers"), Real: ("a finite number", "finite numbers"),
          bool: ("true or false", "true or false values"), str: ("a string", "strings")}
_SIGNS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _constraints(meta) -> dict:
    out = {}
    for m in meta:
        for c in (m.metadata if isinstance(m, FieldInfo) else [m]):
            if isinstance(c, AfterValidator):
                out.setdefault("words", []).append(c.func.words)
            for k in ("gt", "ge", "lt", "le", "multiple_of", "min_length", "max_length"):
                if getattr(c, k, None) is not None:
                    out[k] = getattr(c, k)
    return out


def _bounds(c: dict) -> str:
    lo = next((k for k in ("gt", "ge") if k in c), None)
    hi = next((k for k in ("lt", "le") if k in c), None)
    if lo and hi:
        s = f" in {'(' if lo == 'gt' else '['}{c[lo]}, {c[hi]}{')' if hi == 'lt' else ']'}"
    else:
        s = "".join(f" {_SIGNS[k]} {c[k]}" for k in (lo, hi) if k)
    if "multiple_of" in c:
        s += f", a multiple of {c['multiple_of']}"
    return s + "".join(f", {w}" for w in c.get("words", ()))


def describe(tp, meta=()) -> tuple[str, str]:
    """What a declared type allows, in words: (singular, plural), e.g. ("an integer >= 1",
    "integers >= 1"), ("one of unet, mlp", "values from unet, mlp")."""
    if get_origin(tp) is Annotated:
        tp, *more = get_args(tp)
        return describe(tp, (*more, *meta))
    c = _constraints(meta)
    size = "non-empty " if c.get("min_length") else ""
    if get_origin(tp) is Literal:
        opts = ", ".join(map(str, get_args(tp)))
        one, many = f"one of {opts}", f"values from {opts}"
    elif get_origin(tp) is tuple:
        most = f"at most {c['max_length']} " if "max_length" in c else ""
        one = many = f"a {size}list of {most}{describe(get_args(tp)[0])[1]}"
    elif tp in _NOUNS:
        one, many = _NOUNS[tp]
        if size:  # a string of at least one character
            one, many = f"a {size}{many[:-1]}", size + many
    else:  # a union of section classes
        one = many = " or ".join(getattr(t, "__name__", str(t)) for t in (get_args(tp) or (tp,)))
    return one + _bounds(c), many + _bounds(c)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
def untuple(v):
    """Tuples (nested) as lists: how values are written in JSON and in messages."""
    return [untuple(x) for x in v] if isinstance(v, tuple) else v


def invalid(key: str, value, allowed: str) -> ConfigError:
    """The one-line error for ``key=value``: ``key=value is invalid: allowed ...``."""
    return ConfigError(f"{key}={untuple(value)!r} is invalid: allowed {allowed}")


def field_names(cls) -> list[str]:
    return list(cls.__pydantic_fields__)


def _one_line(exc: pydantic.ValidationError, prefix: str, cls, kw: dict) -> ConfigError:
    err = exc.errors()[0]
    if isinstance(err.get("ctx", {}).get("error"), ConfigError):  # raised by a rule in __post_init__
        return err["ctx"]["error"]
    name = str(err["loc"][0]) if err["loc"] else "?"
    key = f"{prefix}.{name}" if prefix else name
    if name not in cls.__pydantic_fields__:
        return ConfigError(f"unknown config key {key!r}: allowed {', '.join(sorted(field_names(cls)))}")
    f = cls.__pydantic_fields__[name]
    return invalid(key, kw.get(name, err["input"]), describe(f.annotation, f.metadata)[0])


def section(prefix: str):
    """Class decorator: a frozen, strictly checked pydantic dataclass whose errors are one-line
    ``ConfigError``s naming ``prefix.field`` (``prefix`` "" for top-level fields)."""
    strict = pydantic.ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")

    def wrap(cls):
        cls = pydantic.dataclasses.dataclass(frozen=True, config=strict)(cls)
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kw):
            try:
                init(self, *args, **kw)
            except pydantic.ValidationError as exc:
                raise _one_line(exc, prefix, type(self), kw) from None
        cls.__init__ = __init__
        return cls
    return wrap
