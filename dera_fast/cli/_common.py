"""What every command shares: the error type behind the exit-code contract, argument types that reject bad numbers
up front, the common options, output checks, device / dtype resolution, loading a model folder and token
provenance checks."""
from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

log = logging.getLogger("dera_fast")


class CLIError(Exception):
    """A user mistake: reported as one line, exit code ``code`` (2 bad arguments or files, 3 missing extra)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------------ argument types
def _int_type(lo: int, name: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be {name}, got {v}")
        return v
    parse.__name__ = name
    return parse


def _float_type(lo: float | None, hi: float | None, *, lo_open: bool, name: str):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        bad = not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or \
            (hi is not None and v > hi)
        if bad:
            raise argparse.ArgumentTypeError(f"must be {name}, got {s}")
        return v
    parse.__name__ = name
    return parse


def int_at_least(lo: int):
    """An argparse type: an integer >= ``lo``."""
    return _int_type(lo, f"an integer >= {lo}")


positive_int = _int_type(1, "a positive integer")
non_negative_int = _int_type(0, "an integer >= 0")
positive_float = _float_type(0.0, None, lo_open=True, name="a finite number > 0")
finite_float = _float_type(None, None, lo_open=False, name="a finite number")
probability = _float_type(0.0, 1.0, lo_open=True, name="a number in (0, 1]")


def parse_set(items) -> dict:
    """``--set KEY=VALUE`` items (a list, or None) -> {key: value}; a value is read as JSON where it parses, else
    kept as the string (``--set data=clips/`` needs no quotes)."""
    overrides = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise CLIError(f"--set expects key=value, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


# ------------------------------------------------------------------------------------------------ options
_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
           "fp16": "float16", "float16": "float16"}


def add_common_options(p: argparse.ArgumentParser) -> None:
    """--device, --dtype, --backend, --threads, --no-progress."""
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda", "cpp"],
                   help="kernel backend for dera_fast ops: cuda = CUDA kernels, cpp = C++ CPU kernels, "
                        "auto = the fastest measured one (see `dera_fast info`)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default: torch's choice; the demo uses 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_provenance_option(p: argparse.ArgumentParser, help: str) -> None:
    """``--ignore-provenance``: use tokens even where their recorded tokenizer is not the one given."""
    p.add_argument("--ignore-provenance", action="store_true", help=help)


def add_overwrite_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (never an input)")


def output_path(path, *, inputs=(), overwrite: bool = False, kind: str = "file", what: str = "output") -> Path:
    """:func:`dera_fast._files.check_output` as a CLIError (exit 2), plus clearing temporaries of killed runs."""
    from dera_fast._files import OutputError, check_output, clean_stale

    try:
        out = check_output(path, inputs=inputs, overwrite=overwrite, kind=kind, what=what)
    except OutputError as e:
        raise CLIError(str(e)) from None
    clean_stale(out.parent, names={out.name})
    return out


def video_output(path, *, inputs=(), overwrite: bool = False) -> Path:
    """:func:`output_path` for a video / picture output, whose suffix must be one the writers know."""
    from dera_fast.data.writer import WRITE_SUFFIXES

    if Path(path).suffix.lower() not in WRITE_SUFFIXES:
        raise CLIError(f"unsupported output type {Path(path).suffix!r} for {path}; supported: "
                       f"{', '.join(WRITE_SUFFIXES)}")
    return output_path(path, inputs=inputs, overwrite=overwrite)


def model_files(directory) -> list[Path]:
    """A model folder and the files in it a command reads (inputs an output may not replace)."""
    d = Path(directory)
    return [d, d / "config.json", d / "model.safetensors"] if d.is_dir() else [d]


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


# ------------------------------------------------------------------------------------------------ models
def load_tokenizer(directory, device="cpu"):
    """Load a LARP or DeRA tokenizer folder written by ``save_pretrained`` (eval mode)."""
    from dera_fast.models.pretrained import TOKENIZER_TYPES, load_model, read_header

    if not Path(directory).exists():
        raise CLIError(f"--model/--tokenizer {directory}: not found")
    if Path(directory).is_dir() and not (Path(directory) / "config.json").is_file():
        raise CLIError(f"--model/--tokenizer {directory}: no config.json there (expected a folder written by "
                       f"save_pretrained, e.g. <run>/model)")
    kind = read_header(directory)["model_type"]
    if kind not in TOKENIZER_TYPES:
        raise CLIError(f"{directory} is not a tokenizer folder (model_type={kind!r})")
    return load_model(directory, device=device, kinds=TOKENIZER_TYPES)


def check_token_provenance(record: dict, model, *, source: str, ignore: bool) -> None:
    """Refuse (exit 2) tokens that another tokenizer made, unless ``--ignore-provenance``; warn when the record is
    incomplete (files from older writers)."""
    from dera_fast.train.tokens import check_provenance

    problems = check_provenance(record, model, source=source)
    if problems and not ignore:
        raise CLIError(f"{problems[0]} (pass --ignore-provenance to decode anyway)")
    for p in problems:
        log.warning("warning: %s (--ignore-provenance)", p)
    missing = [k for k in ("model_type", "tokenizer_config_hash") if k not in record and
               not (k == "tokenizer_config_hash" and "config_hash" in record)]
    if missing and not problems:
        log.warning("warning: %s records no %s: its tokenizer cannot be verified", source, " or ".join(missing))


def warn_ignored(flags: list[str], why: str) -> None:
    """One warning line naming the command-line ``flags`` the user gave that this run cannot use, and why."""
    if flags:
        names = flags[0] if len(flags) == 1 else ", ".join(flags[:-1]) + " and " + flags[-1]
        log.warning("warning: %s ignored: %s", names, why)


def read_clip_video(path, model, fps, frames: int | None = None):
    """The video (its first ``frames`` frames; None: all) at the model's clip size and pixel range: [3, T, S, S]."""
    from dera_fast.data import read_video

    cfg = model.config
    return read_video(path, frames=frames, size=cfg.size, fps=fps, value_range=cfg.pixel_range)  # [3, T, S, S]
