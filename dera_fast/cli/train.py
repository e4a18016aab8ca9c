"""``dera_fast train tokenizer|generator``: plain or under ``torchrun``."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ._common import CLIError, add_common_options


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a tokenizer or generator (torchrun-compatible)")
    p.add_argument("what", choices=["tokenizer", "generator"])
    p.add_argument("--config", default=None, help="JSON file of training-config fields")
    p.add_argument("--preset", default=None, help="named training preset (tokenizer: tiny, larp-l, dera-l; "
                                                  "generator: tiny, ucf-lp)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<what>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's newest checkpoint")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--data", default=None, help="tokenizer: synthetic, a video folder or a LARP CSV")
    p.add_argument("--tokens", default=None, help="generator: token file from `tokenize`")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config field (JSON value)")
    add_common_options(p)
    p.set_defaults(func=run)


def train_config(args):
    """The training config from ``--config`` or ``--preset``, with ``--set`` and the shortcut flags applied."""
    if args.what == "tokenizer":
        from dera_fast.train.tokenizer import TokenizerTrainConfig as Cfg
    else:
        from dera_fast.train.generator import GeneratorTrainConfig as Cfg
    if (args.config is None) == (args.preset is None):
        raise CLIError("give exactly one of --config cfg.json or --preset NAME")
    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise CLIError(f"--set expects key=value, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    for key in ("steps", "batch_size", "data", "tokens"):
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    if args.config is not None:
        path = Path(args.config)
        if not path.is_file():
            raise CLIError(f"config file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CLIError(f"{path} is not valid JSON ({e})") from None
        return Cfg.from_dict({**data, **overrides})
    return Cfg.from_name(args.preset, **overrides)


def run(args) -> int:
    cfg = train_config(args)
    out = args.out or f"runs/{args.what}"
    from dera_fast.train.loop import run_training

    if args.what == "tokenizer":
        from dera_fast.train.tokenizer import TokenizerTrainer as Trainer
    else:
        from dera_fast.train.generator import GeneratorTrainer as Trainer
    if args.dtype in ("fp32", "float32"):
        cfg.amp = "off"
    result = run_training(Trainer, cfg, out, device=args.device, progress=not args.no_progress, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: round(v, 4) for k, v in result.items()}))
        print(f"model written to {Path(out) / 'model'}")
    return 0
