"""Token files: what ``python -m dera_fast tokenize`` writes and the generator trainer reads (ECOSYSTEM.md §2.3).

One safetensors file with

* ``tokens``: ``[N_clips, L]``, ``uint16`` when the codebook has at most 65536 codes, else ``int32``;
* ``labels``: ``int32 [N_clips]`` class ids (-1 when unlabelled);
* ``clip_start_frames``: ``int32 [N_clips]``, the first frame of each clip in its source;
* string metadata: source, fps, clip_len, stride, size, codebook_size, the tokenizer's provenance (``model_type``
  and ``tokenizer_config_hash``, the hash of its *architecture* fields:
  :func:`dera_fast.models.pretrained.architecture_hash`), dera_fast version, device / dtype / backend used (token
  ids are bit-identical only for the same device, dtype and backend).

:func:`check_provenance` compares a token file (or a generator's record of its training tokens) with a tokenizer.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from dera_fast import __version__
from dera_fast._files import write_file
from dera_fast.models.pretrained import architecture_hash, config_hash, load_tensors, read_metadata

FORMAT = "dera_fast.tokens/1"

__all__ = ["FORMAT", "config_hash", "tokenizer_provenance", "check_provenance", "save_tokens", "load_tokens"]


def tokenizer_provenance(model) -> dict[str, str]:
    """The token-file metadata that identifies ``model`` (a LARP / DeRA tokenizer)."""
    return {"model_type": model.model_type, "tokenizer_config_hash": architecture_hash(model.config),
            "tokens_per_clip": str(model.tokens_per_clip), "codebook_size": str(model.codebook_size)}


def check_provenance(record: dict, model, *, source: str) -> list[str]:
    """Why tokens described by ``record`` do not belong to the tokenizer ``model`` (empty list: they do).

    ``record`` holds (as strings or ints) ``model_type``, ``tokens_per_clip``, ``codebook_size`` and
    ``tokenizer_config_hash`` / ``config_hash``; missing entries (files from older writers) are not compared.
    Older files hashed the whole config: their hash is accepted when it matches the model's whole config.
    """
    problems = []
    rtype = record.get("model_type")
    if rtype is not None and rtype != model.model_type:
        problems.append(f"{source} was made by a {rtype!r} tokenizer, the model is {model.model_type!r}")
    for key, have in (("tokens_per_clip", model.tokens_per_clip), ("codebook_size", model.codebook_size)):
        want = record.get(key)
        if want is not None and str(want) != str(have):
            problems.append(f"{source} has {key}={want}, the model has {have}")
    digest = record.get("tokenizer_config_hash", record.get("config_hash"))
    if digest is not None and digest not in (architecture_hash(model.config), config_hash(model.config.to_dict())):
        problems.append(f"{source} was made by a tokenizer with another architecture (config hash {digest}, "
                        f"the model's is {architecture_hash(model.config)})")
    return problems


def save_tokens(path: str | os.PathLike, tokens: torch.Tensor, *, codebook_size: int,
                labels: torch.Tensor | None = None, starts: torch.Tensor | None = None,
                meta: dict | None = None) -> Path:
    """Write token ids ``[N, L]`` (any integer dtype, values in ``[0, codebook_size)``) to ``path``, atomically."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [N_clips, L], got shape {tuple(tokens.shape)}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= codebook_size):
        raise ValueError(f"token ids must lie in [0, {codebook_size})")
    n = tokens.shape[0]
    dtype = torch.uint16 if codebook_size <= 65536 else torch.int32
    tensors = {
        "tokens": tokens.to("cpu", torch.int64).to(dtype).contiguous(),
        "labels": (labels if labels is not None else torch.full((n,), -1)).to("cpu", torch.int32).contiguous(),
        "clip_start_frames": (starts if starts is not None else torch.zeros(n)).to("cpu", torch.int32).contiguous(),
    }
    metadata = {"format": FORMAT, "dera_fast.version": __version__, "codebook_size": str(codebook_size),
                "tokens_per_clip": str(tokens.shape[1])}
    metadata.update({k: str(v) for k, v in (meta or {}).items()})
    return write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_tokens(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Read a token file: (tokens int64 [N, L], labels int64 [N], metadata dict of str)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file not found: {path}")
    try:
        meta = read_metadata(path)
        tensors = load_tensors(path)
    except ValueError as e:
        raise ValueError(f"{path} is not a readable safetensors token file ({e})") from None
    if meta.get("format") != FORMAT or "tokens" not in tensors:
        raise ValueError(f"{path} is not a dera_fast token file (written by `python -m dera_fast tokenize`)")
    tokens = tensors["tokens"]
    if tokens.dim() != 2 or tokens.dtype not in (torch.uint16, torch.int32, torch.int64):
        raise ValueError(f"{path}: 'tokens' must be an integer [N_clips, L] tensor, got {tokens.dtype} "
                         f"{tuple(tokens.shape)}")
    tokens = tokens.to(torch.int64)
    labels = tensors.get("labels", torch.full((tokens.shape[0],), -1)).to(torch.int64)
    if labels.shape != (tokens.shape[0],):
        raise ValueError(f"{path}: 'labels' must be [{tokens.shape[0]}], got {tuple(labels.shape)}")
    try:
        codebook = int(meta.get("codebook_size", ""))
    except ValueError:
        raise ValueError(f"{path}: metadata codebook_size must be an int, got {meta.get('codebook_size')!r}") from None
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= codebook):
        raise ValueError(f"{path}: token ids outside [0, codebook_size={codebook})")
    return tokens, labels, meta
