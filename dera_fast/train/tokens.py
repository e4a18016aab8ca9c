"""Token files: what ``python -m dera_fast tokenize`` writes and the generator trainer reads (ECOSYSTEM.md §2.3).

One safetensors file with

* ``tokens``: ``[N_clips, L]``, ``uint16`` when the codebook has at most 65536 codes, else ``int32``;
* ``labels``: ``int32 [N_clips]`` class ids (-1 when unlabelled);
* ``clip_start_frames``: ``int32 [N_clips]``, the first frame of each clip in its source;
* string metadata: source, fps, clip_len, stride, size, codebook_size, tokenizer config hash, dera_fast version,
  device / dtype / backend used (token ids are bit-identical only for the same device, dtype and backend).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dera_fast import __version__

FORMAT = "dera_fast.tokens/1"


def config_hash(config: dict) -> str:
    """A short stable hash of a config dict (sorted-key JSON, sha256, 16 hex digits)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def save_tokens(path: str | os.PathLike, tokens: torch.Tensor, *, codebook_size: int,
                labels: torch.Tensor | None = None, starts: torch.Tensor | None = None,
                meta: dict | None = None) -> Path:
    """Write token ids ``[N, L]`` (any integer dtype, values in ``[0, codebook_size)``) to ``path``."""
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
    metadata = {"format": FORMAT, "dera_fast.version": __version__, "codebook_size": str(codebook_size)}
    metadata.update({k: str(v) for k, v in (meta or {}).items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def load_tokens(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Read a token file: (tokens int64 [N, L], labels int64 [N], metadata dict of str)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors token file ({e})") from e
    if meta.get("format") != FORMAT or "tokens" not in tensors:
        raise ValueError(f"{path} is not a dera_fast token file (written by `python -m dera_fast tokenize`)")
    tokens = tensors["tokens"].to(torch.int64)
    labels = tensors.get("labels", torch.full((tokens.shape[0],), -1)).to(torch.int64)
    return tokens, labels, meta
