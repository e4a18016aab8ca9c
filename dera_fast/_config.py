"""Shared (de)serialisation and validation of the dataclass configs: JSON-safe dicts, named presets, field checks.

Every :class:`PresetConfig` dataclass checks its fields on construction, whichever way it is built (``Cls(...)``,
``from_dict`` of a JSON file, ``from_name`` with ``--set`` overrides): each value must match its annotation
(``int``, ``float``, ``bool``, ``str``, ``dict``, ``tuple[float, float]``, ``X | None``), floats must be finite,
and the names listed in the class attributes ``_positive`` / ``_non_negative`` must be > 0 / >= 0. Errors name the
field: ``TypeError`` for a wrong type, ``ValueError`` for a bad value or an unknown field.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any


def _describe(hint) -> str:
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return f"a list of {len(typing.get_args(hint))} numbers" if typing.get_args(hint) else "a list"
    return {int: "an int", float: "a number", bool: "true or false", str: "a string", dict: "an object"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _coerce(hint, value):
    """``value`` converted to ``hint`` (int -> float, list -> tuple), or raise TypeError (message filled by the
    caller); non-finite floats raise ValueError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value)
            except TypeError:
                continue
        raise TypeError
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or (args and Ellipsis not in args and len(value) != len(args)):
            raise TypeError
        if not args:
            return tuple(value)
        items = args[:1] * len(value) if Ellipsis in args else args
        return tuple(_coerce(a, v) for a, v in zip(items, value))
    if origin is not None:  # dict[str, X], list[...]: the container type only
        hint = origin
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError
        if not math.isfinite(value):
            raise ValueError(f"must be finite, got {value!r}")
        return float(value)
    if hint is typing.Any:
        return value
    if isinstance(hint, type) and not isinstance(value, hint):
        raise TypeError
    return value


class PresetConfig:
    """Mixin for ``@dataclass`` configs with named presets.

    Each config class names its own preset table by overriding :meth:`presets` (name -> field values).
    ``to_dict`` gives JSON-safe values (tuples become lists), ``from_dict`` rejects unknown fields and anything
    that is not a JSON object, ``from_name`` applies a named preset plus overrides. ``_kind`` names the config in
    errors; ``_positive`` / ``_non_negative`` list numeric fields checked after the class's own ``__post_init__``.
    """

    _kind = "config"
    _positive = ()        # names of numeric fields that must be > 0 (class attributes, not dataclass fields)
    _non_negative = ()    # ... and >= 0

    def __init_subclass__(cls, **kwargs):
        # NOTE: wrap the subclass's own __post_init__ (if any) before @dataclass reads it, so that every config gets
        # the type and range checks first (its own checks can then compare and divide numbers safely).
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")

        def __post_init__(self):
            self._check_types()
            self._check_ranges()  # before the class's own checks (which may divide by a field) ...
            if own is not None:
                own(self)
                self._check_ranges()  # ... and after them (they may fill fields left at None)

        __post_init__.__doc__ = own.__doc__ if own is not None else None
        cls.__post_init__ = __post_init__

    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            try:
                new = _coerce(hints[f.name], value)
            except TypeError:
                raise TypeError(f"{self._kind} field {f.name!r} must be {_describe(hints[f.name])}, got "
                                f"{value!r}") from None
            except ValueError as e:
                raise ValueError(f"{self._kind} field {f.name!r} {e}") from None
            if new is not value:
                object.__setattr__(self, f.name, new)  # frozen dataclasses too

    def _check_ranges(self) -> None:
        for names, ok, rule in ((self._positive, lambda v: v > 0, "> 0"),
                                (self._non_negative, lambda v: v >= 0, ">= 0")):
            for name in names:
                value = getattr(self, name)
                if value is not None and not ok(value):
                    raise ValueError(f"{self._kind} field {name!r} must be {rule}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        if not isinstance(d, dict):
            raise TypeError(f"expected a JSON object of {cls._kind} fields, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown {cls._kind} fields {unknown}")
        return cls(**d)

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        """The named presets of this config class: name -> field values (each subclass returns its own table; a
        class without one has no presets)."""
        return {}

    @classmethod
    def from_name(cls, name: str, **overrides):
        """A named preset (see :meth:`presets`), with optional field overrides."""
        presets = cls.presets()
        if name not in presets:
            raise ValueError(f"unknown {cls._kind} preset {name!r}; available: {sorted(presets)}")
        return cls.from_dict({**presets[name], **overrides})
