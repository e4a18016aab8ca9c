"""What every command shares: the error type behind the exit-code contract, the common options, device / dtype
resolution and loading a tokenizer folder."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


class CLIError(Exception):
    """A user mistake: reported as one line, exit code ``code`` (2 bad arguments or files, 3 missing extra)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
           "fp16": "float16", "float16": "float16"}


def add_common_options(p: argparse.ArgumentParser) -> None:
    """--device, --dtype, --backend, --threads, --no-progress."""
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"],
                   help="kernel backend for dera_fast ops")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; the demo uses 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def resolve_device(args):
    from dera_fast.train.distributed import resolve_device as _resolve

    try:
        return _resolve(args.device)
    except ValueError as e:
        raise CLIError(str(e)) from None


def resolve_dtype(args, device):
    import torch

    if args.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, _DTYPES[args.dtype])


def load_tokenizer(directory, device="cpu"):
    """Load a LARP or DeRA tokenizer folder written by ``save_pretrained`` (eval mode)."""
    from dera_fast import models

    cfg_path = Path(directory) / "config.json"
    if not cfg_path.is_file():
        raise CLIError(f"--model/--tokenizer {directory}: no config.json there (expected a folder written by "
                       f"save_pretrained, e.g. <run>/model)")
    kind = json.loads(cfg_path.read_text()).get("model_type")
    classes = {"larp": models.LARPTokenizer, "dera": models.DeRATokenizer}
    if kind not in classes:
        raise CLIError(f"{directory} is not a tokenizer folder (model_type={kind!r})")
    return classes[kind].from_pretrained(directory, device=device)


def read_clip_video(path, model, fps):
    """The whole video at the model's clip size and pixel range: [3, T, S, S]."""
    from dera_fast.data import read_video

    cfg = model.config
    return read_video(path, size=cfg.size, fps=fps, value_range=cfg.pixel_range)  # [3, T, S, S]
