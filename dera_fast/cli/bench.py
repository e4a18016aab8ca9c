"""``dera_fast bench``: encode / decode / generate throughput of a preset (random weights)."""
from __future__ import annotations

import json
from pathlib import Path

from ._common import add_common_options, resolve_device, resolve_dtype


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="encode / decode / generate throughput of a preset (random weights)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--what", default="tokenizer,generator")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    add_common_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from dera_fast.demo import bench

    device = resolve_device(args)
    rows = bench(preset=args.preset, what=args.what.split(","), batch=args.batch, iters=args.iters,
                 device=str(device), dtype=resolve_dtype(args, device), backend=args.backend)
    for r in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0
