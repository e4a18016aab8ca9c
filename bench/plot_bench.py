"""Plot pytest-benchmark results: grouped bars of throughput per backend x shape, plus a Markdown table.

    pytest bench --benchmark-json results.json
    python bench/plot_bench.py results.json [more.json ...] --out plot.png --md table.md [--baseline torch]

Each benchmark contributes one bar: its group (one panel per group), its shape (the pytest parameter id without
the backend), its backend (``params["backend"]``, else ``extra_info["backend"]``, else "-"), and its throughput,
the first of ``TFLOP/s``, ``GB/s``, ``tokens/s``, ``pairs/s`` in ``extra_info`` (else calls/s from the median time).
The ratio printed over each bar and in the table is the speed-up over the baseline: ``extra_info["speedup"]``
when the benchmark recorded one, else ``extra_info["baseline_ms"] / ms`` (a baseline timed in the same run), else
the time of the ``--baseline`` backend (default ``torch``) on the same group and shape.
PNG output needs matplotlib (``pip install 'dera-fast[plot]'``); the Markdown table needs only the standard library.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

UNITS = ("TFLOP/s", "GB/s", "tokens/s", "pairs/s")


def load_rows(paths) -> list[dict]:
    """Flatten pytest-benchmark JSON files into rows ``{group, shape, backend, ms, value, unit, ratio, device}``."""
    rows = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"benchmark JSON not found: {path}")
        try:
            data = json.loads(path.read_text())
            benches = data["benchmarks"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a pytest-benchmark JSON file (--benchmark-json): {e}") from e
        for b in benches:
            extra, params = b.get("extra_info") or {}, b.get("params") or {}
            backend = str(params.get("backend", extra.get("backend", "-")))
            ms = extra.get("ms", b["stats"]["median"] * 1e3)
            unit = next((u for u in UNITS if u in extra), "calls/s")
            value = extra[unit] if unit in extra else 1e3 / ms
            parts = [p for p in str(b.get("param") or "").split("-") if p and p != backend]
            rows.append({"group": b.get("group") or b["name"].split("[")[0], "shape": extra.get("shape") or "-".join(parts) or "-",
                         "backend": backend, "ms": ms, "value": value, "unit": unit, "device": extra.get("device", ""),
                         "ratio": extra.get("speedup"), "baseline_ms": extra.get("baseline_ms")})
    if not rows:
        raise ValueError("no benchmarks in the given files")
    return rows


def add_ratios(rows: list[dict], baseline: str) -> None:
    """Fill ``ratio`` (speed-up over the baseline) in place; None where no baseline exists."""
    base_ms = {(r["group"], r["shape"]): r["ms"] for r in rows if r["backend"] == baseline}
    for r in rows:
        if r["ratio"] is not None:
            continue
        if r["baseline_ms"]:
            r["ratio"] = r["baseline_ms"] / r["ms"]
        elif (r["group"], r["shape"]) in base_ms:
            r["ratio"] = base_ms[(r["group"], r["shape"])] / r["ms"]


def markdown_table(rows: list[dict], baseline: str) -> str:
    lines = ["| group | shape | backend | ms | throughput | speed-up | device |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: (r["group"], r["shape"], r["backend"])):
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['group']} | {r['shape']} | {r['backend']} | {r['ms']:.4g} | {r['value']:.4g} {r['unit']} "
                     f"| {ratio} | {r['device']} |")
    lines.append(f"\nspeed-up: the benchmark's own `speedup`, else `baseline_ms / ms` (a baseline timed in the same "
                 f"run), else time of `{baseline}` / time on the same group and shape.")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out, baseline: str) -> Path:
    """One panel per group: x = shapes, one bar per backend, height = throughput, label = speed-up."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install 'dera-fast[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(list)
    for r in rows:
        groups[r["group"]].append(r)
    fig, axes = plt.subplots(len(groups), 1, figsize=(max(6.0, 1.6 * max(len({r["shape"] for r in g})
                                                                          for g in groups.values())),
                                                        3.2 * len(groups)), squeeze=False)
    for ax, (group, grs) in zip(axes[:, 0], sorted(groups.items())):
        shapes = list(dict.fromkeys(r["shape"] for r in grs))
        backends = sorted({r["backend"] for r in grs}, key=lambda b: (b != baseline, b))
        width = 0.8 / len(backends)
        for j, backend in enumerate(backends):
            by_shape = {r["shape"]: r for r in grs if r["backend"] == backend}
            xs = [i + (j - (len(backends) - 1) / 2) * width for i, s in enumerate(shapes) if s in by_shape]
            sel = [by_shape[s] for s in shapes if s in by_shape]
            bars = ax.bar(xs, [r["value"] for r in sel], width, label=backend)
            for bar, r in zip(bars, sel):
                if r["ratio"] is not None:
                    ax.annotate(f"{r['ratio']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=7)
        values = [r["value"] for r in grs if r["value"] > 0]
        if values and max(values) > 100 * min(values):  # shapes spanning decades: keep small bars visible
            ax.set_yscale("log")
        units = sorted({r["unit"] for r in grs})
        ax.set_xticks(range(len(shapes)), shapes, rotation=20, fontsize=8)
        ax.set_ylabel(" / ".join(units))
        ax.set_title(f"{group}  (labels: speed-up over the baseline; {grs[0]['device']})", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json files")
    ap.add_argument("--out", help="PNG to write (needs matplotlib)")
    ap.add_argument("--md", help="Markdown table to write ('-' for stdout)")
    ap.add_argument("--baseline", default="torch", help="backend the speed-ups are relative to (default: torch)")
    args = ap.parse_args(argv)
    try:
        rows = load_rows(args.json)
        add_ratios(rows, args.baseline)
        table = markdown_table(rows, args.baseline)
        if args.md and args.md != "-":
            Path(args.md).parent.mkdir(parents=True, exist_ok=True)
            Path(args.md).write_text(table)
        if args.out:
            plot(rows, args.out, args.baseline)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if not args.md or args.md == "-":
        print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
