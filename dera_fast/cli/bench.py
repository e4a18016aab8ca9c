"""``dera_fast bench``: encode / decode / generate throughput of a preset (random weights)."""
from __future__ import annotations

import json

from ._common import (CLIError, add_common_options, add_overwrite_option, output_path, positive_int, resolve_device,
                      resolve_dtype)


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="encode / decode / generate throughput of a preset (random weights)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--what", default="tokenizer,generator")
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--iters", type=positive_int, default=5)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    add_overwrite_option(p)
    add_common_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from dera_fast._files import write_text
    from dera_fast.demo import bench
    from dera_fast.models import TokenizerConfig

    out = output_path(args.json, overwrite=args.overwrite, what="--json") if args.json else None
    if args.preset not in TokenizerConfig.presets():
        raise CLIError(f"unknown --preset {args.preset!r}; available: {sorted(TokenizerConfig.presets())}")
    device = resolve_device(args)
    rows = bench(preset=args.preset, what=args.what.split(","), batch=args.batch, iters=args.iters,
                 device=str(device), dtype=resolve_dtype(args, device), backend=args.backend)
    for r in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    if out is not None:
        write_text(out, json.dumps(rows, indent=2) + "\n")
    return 0
