"""Reading teacher weight files and renaming their keys.

Accepted files (nothing is downloaded):

* ``.safetensors`` (or a directory holding ``model.safetensors``);
* official PyTorch checkpoints ``.pth`` / ``.pt`` / ``.bin`` (or a directory holding ``pytorch_model.bin``), read
  with ``torch.load(weights_only=True)`` only: tensors and plain containers, never arbitrary pickled objects. A
  top-level ``"model"`` or ``"module"`` dict (training checkpoints) is unwrapped.

``python -m dera_fast convert-teacher`` turns the second kind into the first, so weights can be kept pickle-free.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from ..pretrained import rename_key

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
WRAPPER_KEYS = ("model", "module")  # training checkpoints keep the weights under one of these
# metadata keys of a file written by convert-teacher
META_FORMAT, META_ARCH, META_CLASS, META_CONFIG = ("dera_fast.teacher", "dera_fast.teacher_arch",
                                                  "dera_fast.teacher_config_class", "dera_fast.teacher_config")
TEACHER_FORMAT = "dera_fast.teacher/1"


def resolve_weights_file(path: str | os.PathLike) -> Path:
    """The weight file behind ``path`` (a file, or a directory with model.safetensors / pytorch_model.bin)."""
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin in this directory")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (teachers load local weight files only)")
    return path


def _unwrap(obj, source: Path) -> dict[str, Tensor]:
    """Descend through "model" / "module" wrappers to the flat {name: tensor} state dict."""
    for _ in range(3):  # e.g. {"model": {"module": {...}}}
        if isinstance(obj, dict) and not any(isinstance(v, Tensor) for v in obj.values()):
            inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: expected a state dict (or one under 'model' / 'module'), got "
                         f"{type(obj).__name__}")
    state = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        raise ValueError(f"{source}: holds no tensors (top-level keys: {sorted(map(str, obj))[:8]})")
    return state


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(state dict on CPU, safetensors metadata or {}) of a teacher weight file; see the module docstring."""
    file = resolve_weights_file(path)
    if file.suffix == ".safetensors":
        try:
            with safe_open(str(file), framework="pt") as f:
                meta = dict(f.metadata() or {})
            return load_file(str(file)), meta
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file} is not a readable safetensors file ({e})") from None
    if file.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"{file}: unsupported weight file type {file.suffix!r} (use .safetensors, .pth, .pt or "
                         f".bin)")
    try:
        # argparse.Namespace is what training scripts store as "args": plain attributes, safe to rebuild.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{file}: refused by torch.load(weights_only=True), which loads tensors and plain "
                         f"containers only ({first}); re-save just its state dict") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{file} is not a readable PyTorch checkpoint ({e})") from None
    return _unwrap(obj, file), {}


def config_to_json(config) -> str:
    return json.dumps(dataclasses.asdict(config))


def recorded_config(meta: dict[str, str] | None, config_cls):
    """The config a convert-teacher file carries (an instance of ``config_cls``), or None for other files."""
    if not meta or meta.get(META_FORMAT) != TEACHER_FORMAT:
        return None
    kind = meta.get(META_CLASS)
    if kind != config_cls.__name__:
        raise ValueError(f"this file holds a {kind} teacher, not a {config_cls.__name__} one "
                         f"(arch {meta.get(META_ARCH)!r})")
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    data = json.loads(meta[META_CONFIG])
    return config_cls(**{k: tuple(v) if isinstance(v, list) and str(fields[k].type).startswith("tuple") else v
                         for k, v in data.items()})


def resolve_config(config, presets: dict, config_cls, recorded):
    """A teacher config from a preset name, a config object, or (config None) the file's recorded config."""
    if config is None:
        if recorded is None:
            raise ValueError(f"config: give a preset ({', '.join(sorted(presets))}) or a {config_cls.__name__}; "
                             f"only files written by `dera_fast convert-teacher` carry their own")
        return recorded
    if isinstance(config, str):
        if config not in presets:
            raise ValueError(f"unknown teacher preset {config!r}; available: {sorted(presets)}")
        return presets[config]
    if not isinstance(config, config_cls):
        raise TypeError(f"config must be a preset name or a {config_cls.__name__}, got {type(config).__name__}")
    return config


def resolve_layout(layout: str, state: dict[str, Tensor], hf_prefixes: tuple[str, ...]) -> str:
    """"hub" or "hf": ``layout`` checked, or for "auto" read from the keys (HF's start with ``hf_prefixes``)."""
    if layout == "auto":
        return "hf" if any(k.startswith(hf_prefixes) for k in state) else "hub"
    if layout not in ("hub", "hf"):
        raise ValueError(f"layout must be 'auto', 'hub' or 'hf', got {layout!r}")
    return layout


def strip_prefixes(state: dict[str, Tensor], pattern: str) -> dict[str, Tensor]:
    """Remove leading ``pattern`` (regex) matches from every key (repeatedly: "module.backbone.x" -> "x")."""
    return {re.sub(f"^(?:{pattern})+", "", k): v for k, v in state.items()}


def rename_state(state: dict[str, Tensor], rules: list[tuple[str, str]], drop: str) -> dict[str, Tensor]:
    """Apply the first matching (regex, template) rule to every key; drop keys matching ``drop``."""
    out = {}
    for key, value in state.items():
        if re.fullmatch(drop, key):
            continue
        out[rename_key(key, rules) or key] = value
    return out


def fuse_qkv(state: dict[str, Tensor], prefix: str, names: tuple[str, str, str], dst: str) -> None:
    """Concatenate separate q/k/v Linears (HF layouts) into one qkv tensor; a missing k bias becomes zeros."""
    for kind in ("weight", "bias"):
        parts = [state.pop(f"{prefix}.{n}.{kind}", None) for n in names]
        if all(p is None for p in parts):
            continue
        if kind == "bias" and parts[1] is None and parts[0] is not None:
            parts[1] = torch.zeros_like(parts[0])
        if any(p is None for p in parts):  # leave the fragments so the strict load names them
            state.update({f"{prefix}.{n}.{kind}": p for n, p in zip(names, parts) if p is not None})
            continue
        state[f"{dst}.{kind}"] = torch.cat(parts)
