"""Markdown tables of the CPU vq_nearest grid (bench/bench_vq.py::bench_vq_nearest_cpu_grid), one per thread count.

    python bench/vq_grid_table.py bench/results/cpu-2core/vq_nearest*.json [--target 2] [--md OUT.md]

Every ratio is between variants timed in the same interleaved rounds of one record (``extra_info["variants"]``);
throughput is also given against the machine's fp32 and bf16 matmul rates measured in the same run.
"""
import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

_TARGET_N = (4096, 16384)  # the issue-13 grid; N = 1 and 64 are the small-batch class


def load(paths) -> list[dict]:
    """The grid records of the given pytest-benchmark JSON files (their extra_info)."""
    records = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        for bench in data.get("benchmarks", []):
            extra = bench.get("extra_info", {})
            if bench.get("group") == "vq_nearest_cpu_grid" and "variants" in extra:
                records.append(extra)
    if not records:
        raise ValueError(f"no vq_nearest_cpu_grid records in {', '.join(map(str, paths))}")
    return records


def table(records: list[dict], target: float | None) -> str:
    by_threads = defaultdict(list)
    for r in records:
        by_threads[r["threads"]].append(r)
    out = []
    for threads in sorted(by_threads, reverse=True):
        rows = sorted(by_threads[threads], key=lambda r: (r["N"] not in _TARGET_N, r["N"], r["K"], r["D"]))
        first = rows[0]
        out += [f"### {threads} thread(s): C++ kernel variant `{first.get('cpu_kernel_isa', '?')}`, "
                f"fp32 matmul {first['matmul_gflops']:.0f} GFLOP/s, "
                f"bf16 matmul {first.get('matmul_bf16_gflops', float('nan')):.0f} GFLOP/s", "",
                "| N | K | D | auto ms | torch path ms | cdist+argmin ms | auto / torch | auto / cdist "
                "| torch-path GEMMs alone ms (share) | auto GFLOP/s | of fp32 matmul | of bf16 matmul |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        worst = None
        for r in rows:
            v = r["variants"]
            ratio = v["torch"] / v["auto"]
            if r["N"] in _TARGET_N:
                worst = ratio if worst is None else min(worst, ratio)
            gf = r["gflops"]["auto"]
            out.append(f"| {r['N']} | {r['K']} | {r['D']} | {v['auto']:.3g} | {v['torch']:.3g} | {v['cdist']:.3g} "
                       f"| **{ratio:.2f}x** | {v['cdist'] / v['auto']:.2f}x "
                       f"| {v['torch-gemm-only']:.3g} ({v['torch-gemm-only'] / v['torch']:.0%}) | {gf:.0f} "
                       f"| {gf / r['matmul_gflops']:.0%} | {gf / r.get('matmul_bf16_gflops', float('nan')):.0%} |")
        if worst is not None:
            verdict = "" if target is None else (" (meets" if worst >= target else " (misses") + f" {target:g}x)"
            out += ["", f"Lowest auto / torch over N in {_TARGET_N}: **{worst:.2f}x**{verdict}."]
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json files of the cpu_grid benchmark")
    ap.add_argument("--target", type=float, default=None, help="the speed-up the grid must reach")
    ap.add_argument("--md", help="write the tables here instead of standard output")
    args = ap.parse_args(argv)
    try:
        text = table(load(args.json), args.target)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.md:
        Path(args.md).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
