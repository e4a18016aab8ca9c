"""Shared (de)serialisation of the dataclass configs: JSON-safe dicts and named presets."""
from __future__ import annotations

import dataclasses
import sys
from typing import Any


class PresetConfig:
    """Mixin for ``@dataclass`` configs whose defining module has ``PRESETS: dict[str, dict]``.

    ``to_dict`` gives JSON-safe values (tuples become lists), ``from_dict`` rejects unknown fields and restores
    tuple-typed fields, ``from_name`` applies a named preset plus overrides. ``_kind`` names the config in errors.
    """

    _kind = "config"

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"unknown {cls._kind} fields {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) and str(fields[k].type).startswith("tuple") else v
                      for k, v in d.items()})

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        return sys.modules[cls.__module__].PRESETS

    @classmethod
    def from_name(cls, name: str, **overrides):
        """A named preset (see the module's PRESETS), with optional field overrides."""
        presets = cls.presets()
        if name not in presets:
            raise ValueError(f"unknown {cls._kind} preset {name!r}; available: {sorted(presets)}")
        return cls.from_dict({**presets[name], **overrides})
