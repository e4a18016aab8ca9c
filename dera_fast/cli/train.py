"""``dera_fast train tokenizer|generator``: plain or under ``torchrun``."""
from __future__ import annotations

import json
import os
from pathlib import Path

from dera_fast._validation import parse_json_object

from ._common import CLIError, add_common_options, non_negative_int, parse_set, positive_float, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a tokenizer or generator (torchrun-compatible)")
    p.add_argument("what", choices=["tokenizer", "generator"])
    p.add_argument("--config", default=None, help="JSON file of training-config fields")
    p.add_argument("--preset", default=None, help="named training preset (tokenizer: tiny, demo, larp-l, dera-l; "
                                                  "generator: tiny, ucf-lp, k600-fp-lp, dera-ucf, dera-k600-fp)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<what>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's newest intact "
                                                         "checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start over in a run folder that holds a previous run "
                                                            "(its checkpoints, metrics and model are deleted)")
    p.add_argument("--steps", type=positive_int, default=None, help="optimiser steps (switches an epoch-based preset to "
                                                             "this count unless --epochs is given)")
    p.add_argument("--epochs", type=positive_float, default=None, help="training length in epochs over --data (steps "
                                                              "derived at run time, as LARP)")
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--data", default=None, help="synthetic (tokenizer), a video folder or a LARP CSV")
    p.add_argument("--tokens", default=None, help="generator: token file from `tokenize` (class task)")
    p.add_argument("--task", default=None, choices=["class", "frame-prediction"],
                   help="generator: class-conditional or frame prediction (5 context frames, LARP_AR_FP)")
    p.add_argument("--tokenizer", default=None, help="generator: frozen tokenizer folder that tokenizes --data "
                                                     "on the fly")
    p.add_argument("--teacher-image", default=None, help="tokenizer (DeRA): image-teacher weights (DINOv3 "
                                                         ".safetensors/.pth; preset field teacher_image_arch)")
    p.add_argument("--teacher-video", default=None, help="tokenizer (DeRA): video-teacher weights (InternVideo2 "
                                                         "B/14 .safetensors/.pth; preset field teacher_video_arch)")
    p.add_argument("--teachers", default=None, choices=["files", "random"],
                   help="tokenizer (DeRA): 'random' aligns with seeded random stand-ins where no file is given "
                        "(smoke tests only; recorded in the run's config and metrics)")
    p.add_argument("--workers", type=non_negative_int, default=None,
                   help="data-loading worker processes per rank (default: min(8, CPU cores per rank))")
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
    overrides = parse_set(args.set)
    only = {"tokenizer": ("teacher_image", "teacher_video", "teachers"), "generator": ("tokens", "task", "tokenizer")}
    other = "generator" if args.what == "tokenizer" else "tokenizer"
    for key in only[other]:
        if getattr(args, key, None) is not None:
            raise CLIError(f"--{key.replace('_', '-')} applies to `train {other}` only")
    for key in ("steps", "epochs", "batch_size", "data", *only[args.what]):
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    if args.workers is not None:
        overrides["num_workers"] = args.workers
    if args.steps is not None and args.epochs is None:
        overrides.setdefault("epochs", 0)  # explicit steps win over an epoch-based preset
    if args.config is not None:
        path = Path(args.config)
        if not path.is_file():
            raise CLIError(f"config file not found: {path}")
        try:
            data = parse_json_object(path.read_bytes(), path, "a JSON object of config fields")
        except ValueError as e:
            raise CLIError(str(e)) from None
    try:
        if args.config is not None:
            return Cfg.from_dict({**data, **overrides})
        return Cfg.from_name(args.preset, **overrides)
    except (TypeError, ValueError) as e:  # a field of the wrong type or value, named in the message
        raise CLIError(str(e)) from None


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
    if args.resume and args.overwrite:
        raise CLIError("--resume continues the run in --out, --overwrite deletes it: give one of them")
    inputs = [args.config, *(getattr(cfg, k, None) or None for k in ("data", "tokens", "tokenizer", "teacher_image",
                                                                     "teacher_video", "perceptual_weights"))]
    result = run_training(Trainer, cfg, out, device=args.device, progress=False if args.no_progress else None,
                          resume=args.resume, overwrite=args.overwrite,
                          inputs=[p for p in inputs if p and p != "synthetic"])
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: round(v, 4) for k, v in result.items()}))
        print(f"model written to {Path(out) / 'model'}")
    return 0
