"""One checkpoint format for every model (tokenizers and the AR generator), and one strict loader.

A ``save_pretrained`` folder holds

* ``config.json``: ``{"model_type", "format_version", "dera_fast_version", "config": {...}}`` plus optional
  provenance entries (e.g. the tokenizer a generator was trained on);
* ``model.safetensors``: the weights, with ``dera_fast.model_type``, ``dera_fast.format_version`` and
  ``dera_fast.config`` in its metadata, so the file also loads on its own.

Folders are written atomically (:func:`dera_fast._files.atomic_dir`). Loading refuses, with a ValueError naming the
file: a config.json that is not a JSON object or has wrong / unknown / missing fields, a ``format_version`` newer
than this dera_fast reads, weights that are not safetensors (a pickle renamed, a truncated file), and state dicts
with missing, unexpected or mis-shaped keys. Generator folders from before this format (a bare GeneratorConfig as
config.json) still load. Models come back in eval mode on ``device``.

The *architecture* of a config (what :func:`architecture_hash` covers, what a resume must not change) is every
field except :data:`NON_ARCHITECTURE_FIELDS`: loss weights, schedules, dropout, initialisation and training-time
sampling options, which may change without changing what a model computes at inference or which weights it holds.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .._validation import parse_json_object

FORMAT_VERSION = 1

# model_type -> "module:Class"; imported on demand (the model modules import this one)
MODEL_TYPES = {"larp": "dera_fast.models.larp:LARPTokenizer", "dera": "dera_fast.models.dera:DeRATokenizer",
               "ar_generator": "dera_fast.models.ar:ARGenerator"}
TOKENIZER_TYPES = ("larp", "dera")
OWN_FILES = ("config.json", "model.safetensors", "classes.json")  # what save_pretrained may write in a folder

# Config fields that are not architecture: changing them changes neither the weights' shapes nor what the model
# computes in eval mode, so they are left out of token provenance hashes and may change on resume.
NON_ARCHITECTURE_FIELDS: dict[str, frozenset[str]] = {
    "TokenizerConfig": frozenset({
        "vq_temperature",            # SVQ sampling temperature: training draws only (eval takes the argmax)
        "vq_beta", "vq_codebook_weight",                        # VQ loss weights
        "query_init_std",            # initialisation
        "prior_dropout", "prior_rounds", "prior_ss_max_ratio", "prior_ss_peak_fraction",  # prior training schedule
        "prior_ce_temperature",
        "align_weight_appearance", "align_weight_motion",      # alignment loss weights
        "align_grid_match",          # how the alignment loss matches grids
        # (codebook-health options live in TokenizerTrainConfig; any moved here belong in this set)
    }),
    "GeneratorConfig": frozenset({
        "class_dropout_prob", "token_dropout_p", "resid_dropout_p", "ffn_dropout_p",  # regularisation
        "initializer_range",         # initialisation
    }),
}


def architecture(config) -> dict[str, Any]:
    """``config.to_dict()`` without its :data:`NON_ARCHITECTURE_FIELDS`."""
    skip = NON_ARCHITECTURE_FIELDS.get(type(config).__name__, frozenset())
    return {k: v for k, v in config.to_dict().items() if k not in skip}


def config_hash(config: dict) -> str:
    """A short stable hash of a config dict (sorted-key JSON, sha256, 16 hex digits)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def architecture_hash(config) -> str:
    """The identity of a model config for token provenance: :func:`config_hash` of :func:`architecture`."""
    return config_hash(architecture(config))


def architecture_diff(saved: dict, current: dict) -> list[str]:
    """``"field: saved -> now"`` for every architecture field that differs between two config dicts."""
    return [f"{k}: {saved.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r}"
            for k in sorted(set(saved) | set(current)) if saved.get(k, "<absent>") != current.get(k, "<absent>")]


# ------------------------------------------------------------------------------------------------ reading
def _safetensors_error(path, e: Exception) -> ValueError:
    return ValueError(f"{path} is not a readable safetensors file (truncated, damaged, or another format such as a "
                      f"pickle: {e})")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file; ValueError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (or not a regular file)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _safetensors_error(path, e) from None


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Every tensor of a safetensors file; ValueError (naming the file) if it is truncated or not safetensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (or not a regular file)")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _safetensors_error(path, e) from None


def _check_version(version, source) -> int:
    if isinstance(version, str) and version.isdigit():
        version = int(version)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"{source}: format_version must be a non-negative int, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{source} has format_version {version}, newer than this dera_fast reads "
                         f"({FORMAT_VERSION}); upgrade dera_fast")
    return version


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """What a saved model is, without building it.

    Args:
        path: a ``save_pretrained`` folder, or a lone ``.safetensors`` written by one.
    Returns:
        ``{"model_type", "format_version", "config": dict, "weights": Path, ...}`` plus the header's other entries
        (provenance). Legacy generator folders (bare config) come back as ``model_type="ar_generator"``,
        ``format_version=0``.
    """
    path = Path(path)
    if path.is_dir():
        cfg_path, weights = path / "config.json", path / "model.safetensors"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path} not found (expected a folder written by save_pretrained, "
                                    f"e.g. <run>/model)")
        try:
            text = cfg_path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read {cfg_path} ({e})") from None
        header = parse_json_object(text, cfg_path)
        source = cfg_path
    elif path.is_file():
        weights, source = path, path
        meta = read_metadata(path)
        if "dera_fast.config" not in meta:
            raise ValueError(f"{path} has no dera_fast.config metadata (not written by save_pretrained)")
        config = parse_json_object(meta["dera_fast.config"], f"{path} (dera_fast.config metadata)")
        header = {"config": config, "model_type": meta.get("dera_fast.model_type"),
                  "format_version": meta.get("dera_fast.format_version", 0 if meta.get("dera_fast.kind") ==
                                             "generator" else 1)}
        if header["model_type"] is None and meta.get("dera_fast.kind") == "generator":
            header["model_type"] = "ar_generator"
    else:
        raise FileNotFoundError(f"{path} not found (expected a folder written by save_pretrained)")
    if "config" not in header and "model_type" not in header:  # legacy ARGenerator folder: the bare config
        header = {"model_type": "ar_generator", "format_version": 0, "config": header}
    for key in ("model_type", "config"):
        if key not in header:
            raise ValueError(f"{source} lacks the {key!r} entry (not written by save_pretrained)")
    if not isinstance(header["config"], dict):
        raise ValueError(f"{source}: 'config' must be a JSON object, got {type(header['config']).__name__}")
    if header["model_type"] not in MODEL_TYPES:
        raise ValueError(f"{source}: unknown model_type {header['model_type']!r}; known: {sorted(MODEL_TYPES)}")
    header["format_version"] = _check_version(header.get("format_version", 1), source)
    header["weights"] = weights
    return header


def _class_for(model_type: str):
    module, name = MODEL_TYPES[model_type].split(":")
    return getattr(importlib.import_module(module), name)


def build_config(config_cls, config: dict, source):
    """``config_cls.from_dict(config)`` with type / value errors reported against ``source``."""
    try:
        return config_cls.from_dict(config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: bad {config_cls.__name__}: {e}") from None


def load_pretrained(cls, path: str | os.PathLike, *, config_cls, device: str | torch.device = "cpu") -> nn.Module:
    """Build ``cls(config)`` from a saved folder or file, load its weights strictly, move to ``device``, eval mode.

    ``cls.model_type`` must match the saved ``model_type`` (a DeRA folder never loads as LARP).
    """
    header = read_header(path)
    if header["model_type"] != cls.model_type:
        what = "tokenizer" if header["model_type"] in TOKENIZER_TYPES else "model"
        raise ValueError(f"{path} holds a {header['model_type']!r} {what}, not {cls.model_type!r}; load it with "
                         f"the matching class (or dera_fast.models.pretrained.load_model)")
    model = cls(build_config(config_cls, header["config"], header["weights"]))
    state = load_tensors(header["weights"])
    load_state_dict_strict(model, state, source=str(header["weights"]))
    return model.to(device).eval()


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu", kinds=None) -> nn.Module:
    """Load any saved model, its class chosen by the saved ``model_type`` (optionally one of ``kinds``)."""
    header = read_header(path)
    if kinds is not None and header["model_type"] not in kinds:
        raise ValueError(f"{path} holds a {header['model_type']!r} model; expected one of {sorted(kinds)}")
    return _class_for(header["model_type"]).from_pretrained(path, device=device)


# ------------------------------------------------------------------------------------------------ writing
def save_pretrained(directory: str | os.PathLike, *, model_type: str, config: dict, state_dict: dict[str, Tensor],
                    extra: dict | None = None, files: dict[str, str] | None = None) -> Path:
    """Write a model folder (config.json + model.safetensors [+ ``files``: name -> text]) atomically.

    A folder holding only :data:`OWN_FILES` is replaced as a whole; a folder that also holds other files keeps
    them, and each of ours is replaced atomically on its own.
    """
    from dera_fast import __version__
    from dera_fast._files import atomic_dir, check_output, write_file, write_text

    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {sorted(MODEL_TYPES)}, got {model_type!r}")
    directory = check_output(directory, kind="dir", overwrite=True, what="save_pretrained directory")
    header = {"model_type": model_type, "format_version": FORMAT_VERSION, "dera_fast_version": __version__,
              "config": config, **(extra or {})}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    meta = {"format": "pt", "dera_fast.model_type": model_type, "dera_fast.format_version": str(FORMAT_VERSION),
            "dera_fast.config": json.dumps(config), "dera_fast.version": __version__,
            "dera_fast.kind": "generator" if model_type == "ar_generator" else "tokenizer"}
    texts = {"config.json": json.dumps(header, indent=2) + "\n", **(files or {})}
    ours = {*OWN_FILES, *texts}
    if directory.is_dir() and any(p.name not in ours for p in directory.iterdir()):
        for name, text in texts.items():
            write_text(directory / name, text)
        write_file(directory / "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        return directory
    with atomic_dir(directory) as tmp:
        for name, text in texts.items():
            (tmp / name).write_text(text)
        save_file(tensors, str(tmp / "model.safetensors"), metadata=meta)
    return directory


# ------------------------------------------------------------------------------------------------ state dicts
def rename_key(key: str, rules: list[tuple[str, str]]) -> str | None:
    """Apply the first (regex, template) rule that fully matches ``key``; None if no rule matches."""
    for pattern, template in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, template, key)
    return None


def check_state_dict(own: dict[str, Tensor], state: dict[str, Tensor], *, source: str, target: str) -> None:
    """One ValueError listing the missing, unexpected and mis-shaped keys of ``state`` against ``own``."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(f"cannot load {source} into {target}: missing keys {missing}; "
                         f"unexpected keys {unexpected}; shape mismatches {shapes}")


def load_state_dict_strict(model: nn.Module, state: dict[str, Tensor], *, source: str) -> None:
    """load_state_dict(strict=True) with one ValueError that lists missing, unexpected and mis-shaped keys."""
    check_state_dict(model.state_dict(), state, source=source, target=type(model).__name__)
    model.load_state_dict(state, strict=True)
