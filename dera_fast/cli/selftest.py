"""``dera_fast selftest``: every op on every usable backend and device against its reference (``--bench``: timed)."""
from __future__ import annotations

import json
import sys
import time
from ._common import CLIError, add_overwrite_option, output_path, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("selftest", help="check every op on every usable backend against its reference",
                       description="Runs vq_nearest (l2, cosine), vq_sample, codebook_cross_entropy (fwd+bwd), "
                                   "attention (fwd+bwd: dense, causal, q_rows, varlen), gradient_gram and "
                                   "sacp_project on every backend of each device, on awkward and real model shapes. "
                                   "Exit code 1 if any row fails; a backend that cannot run is a 'skip' row.")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "all"],
                   help="cpu (default), cuda, or all (every device present)")
    p.add_argument("--bench", action="store_true",
                   help="also time every row and the torch path on the same inputs (same run) and print the ratio")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write {'meta': ..., 'records': [one per row: op, variant, backend, device, shape, dtype, "
                        "status, max_err, tol, reason, ms, torch_ms, speedup]}")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default: torch's choice)")
    add_overwrite_option(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from dera_fast import backends, selftest
    from dera_fast._files import write_text

    has_cuda = torch.cuda.is_available()
    if args.device == "cuda" and not has_cuda:
        raise CLIError("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False)")
    devices = ["cpu", "cuda"] if args.device == "all" and has_cuda else ["cuda"] if args.device == "cuda" else ["cpu"]
    out = output_path(args.json, overwrite=args.overwrite, what="--json") if args.json else None
    t0 = time.perf_counter()
    done = [0]

    def progress(row):
        done[0] += 1
        if row.status == "fail":
            print(f"FAIL {row.op} [{row.variant}] {row.backend}/{row.device} {row.shape}: {row.reason or row.max_err}",
                  file=sys.stderr, flush=True)

    rows = selftest.run(devices, bench=args.bench, progress=progress)
    elapsed = time.perf_counter() - t0
    print(selftest.format_table(rows, args.bench))
    counts = {s: sum(r.status == s for r in rows) for s in ("pass", "fail", "skip")}
    print(f"\n{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped on {', '.join(devices)} "
          f"in {elapsed:.1f} s")
    if out is not None:
        info = backends.info()
        meta = {k: info[k] for k in ("dera_fast", "python", "torch", "torch_cuda", "gpu", "gpu_capability", "triton",
                                     "triton_error", "extension_loaded", "extension_error")}
        meta.update(devices=devices, bench=args.bench, seconds=round(elapsed, 2), threads=torch.get_num_threads())
        payload = json.dumps({"meta": meta, "records": [r.record() for r in rows]}, indent=1, default=str)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text(out, payload)  # atomic: a reader never sees half a file
        print(f"wrote {out}")
    return 1 if counts["fail"] else 0
