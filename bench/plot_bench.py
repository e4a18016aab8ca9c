"""Plot pytest-benchmark results: grouped bars of throughput per backend x shape, plus a Markdown table.

    pytest bench --benchmark-json results.json
    python bench/plot_bench.py results.json [more.json ...] --out plot.png --md table.md \
        [--baseline torch] [--baseline 'attention=sdpa-*'] [--baseline 'vq_*=naive']

Each benchmark contributes one bar: its group (one panel per group), its shape (``extra_info["shape"]``, else the
pytest parameter id without the backend), its backend (``params["backend"]``, else ``extra_info["backend"]``, else
"-"), and its throughput, the first of ``TFLOP/s``, ``GB/s``, ``tokens/s``, ``pairs/s`` in ``extra_info`` (else
calls/s from the median time). A benchmark that timed several variants in interleaved rounds records their median
ms in ``extra_info["variants"]`` (name -> ms) and contributes one bar per variant.
Speed-ups are computed here, from the JSON, never from the order the benchmarks ran in: the time of the baseline
on the same group and shape divided by the bar's time. The baseline of a group is the first ``--baseline
GROUP_GLOB=BACKEND_GLOB`` whose group pattern matches (a bare ``BACKEND_GLOB`` applies to every group; default
``torch``); when several backends match the backend pattern (``sdpa-*``), the fastest of them is the baseline.
Baselines measured together with the bar win: a variants record's own ``extra_info["baseline"]`` for its variants
(timed in the same rounds), else a benchmark's ``extra_info["baseline_ms"]`` (a baseline it timed itself).
PNG output needs matplotlib (``pip install 'dera-fast[plot]'``); the Markdown table needs only the standard library.
"""
from __future__ import annotations

import argparse
import fnmatch
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
            row = {"group": b.get("group") or b["name"].split("[")[0],
                   "shape": extra.get("shape") or "-".join(parts) or "-", "backend": backend, "ms": ms,
                   "value": value, "unit": unit, "device": extra.get("device", ""), "ratio": None,
                   "baseline_ms": extra.get("baseline_ms"), "own_baseline": None}
            variants = extra.get("variants")
            if not variants:
                rows.append(row)
                continue
            for name, v_ms in variants.items():  # timed together: one bar each, same group and shape
                rows.append({**row, "backend": name, "ms": v_ms, "value": value * ms / v_ms if unit != "calls/s"
                             else 1e3 / v_ms, "own_baseline": variants.get(extra.get("baseline"))})
    if not rows:
        raise ValueError("no benchmarks in the given files")
    return rows


def parse_baselines(specs: list[str] | None) -> list[tuple[str, str]]:
    """``["torch", "attention=sdpa-*"]`` -> [("attention", "sdpa-*"), ("*", "torch")]: specific ones first."""
    pairs = [tuple(s.split("=", 1)) if "=" in s else ("*", s) for s in (specs or ["torch"])]
    return sorted(pairs, key=lambda p: p[0] == "*")


def baseline_of(group: str, baselines: list[tuple[str, str]]) -> str | None:
    return next((b for g, b in baselines if fnmatch.fnmatchcase(group, g)), None)


def add_ratios(rows: list[dict], baselines: list[tuple[str, str]]) -> None:
    """Fill ``ratio`` (speed-up over the group's baseline, computed from the recorded times) in place; None where
    no baseline exists."""
    base_ms: dict = {}
    for r in rows:
        pattern = baseline_of(r["group"], baselines)
        if pattern and fnmatch.fnmatchcase(r["backend"], pattern):
            key = (r["group"], r["shape"])
            base_ms[key] = min(base_ms.get(key, float("inf")), r["ms"])  # several matches: the fastest
    for r in rows:
        base = r["own_baseline"] or r["baseline_ms"] or base_ms.get((r["group"], r["shape"]))
        r["ratio"] = base / r["ms"] if base else None


def markdown_table(rows: list[dict], baselines: list[tuple[str, str]]) -> str:
    lines = ["| group | shape | backend | ms | throughput | speed-up | device |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: (r["group"], r["shape"], r["backend"])):
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['group']} | {r['shape']} | {r['backend']} | {r['ms']:.4g} | {r['value']:.4g} {r['unit']} "
                     f"| {ratio} | {r['device']} |")
    desc = ", ".join(f"`{b}`" if g == "*" else f"`{b}` for {g}" for g, b in baselines)
    lines.append(f"\nspeed-up: time of the baseline ({desc}; the fastest where a pattern matches several) / time, "
                 f"same group and shape, from the recorded times (variants of one record: timed in the same "
                 f"interleaved rounds).")
    return "\n".join(lines) + "\n"


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (ImportError naming the extra when matplotlib is missing)."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install 'dera-fast[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out) -> Path:
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    _pyplot().close(fig)
    return out


def plot(rows: list[dict], out, baselines: list[tuple[str, str]]) -> Path:
    """One panel per group: x = shapes, one bar per backend, height = throughput, label = speed-up."""
    plt = _pyplot()

    groups = defaultdict(list)
    for r in rows:
        groups[r["group"]].append(r)
    fig, axes = plt.subplots(len(groups), 1, figsize=(max(6.0, 1.6 * max(len({r["shape"] for r in g})
                                                                          for g in groups.values())),
                                                        3.2 * len(groups)), squeeze=False)
    for ax, (group, grs) in zip(axes[:, 0], sorted(groups.items())):
        shapes = list(dict.fromkeys(r["shape"] for r in grs))
        base = baseline_of(group, baselines) or ""
        backends = sorted({r["backend"] for r in grs}, key=lambda b: (not fnmatch.fnmatchcase(b, base), b))
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
    return _save(fig, out)


def plot_grid(rows: list[dict], out, target: float | None = None, only: list[str] | None = None) -> Path:
    """Speed-up over the baseline against D, one panel per device (thread count), one line per (N, K) and backend
    (``only``: these backends), for shapes named N{n}-K{k}-D{d} (the CPU vq_nearest grid)."""
    import re

    plt = _pyplot()

    series = defaultdict(list)
    for r in rows:
        m = re.fullmatch(r"N(\d+)-K(\d+)-D(\d+)", r["shape"])
        if m and r["ratio"] is not None and (only is None or r["backend"] in only) and r["ratio"] != 1.0:
            n, k, d = map(int, m.groups())
            series[(r["device"], n, k, r["backend"])].append((d, r["ratio"]))
    if not series:
        raise ValueError("no N{n}-K{k}-D{d} shapes with a speed-up to plot")
    devices = sorted({key[0] for key in series})
    fig, axes = plt.subplots(1, len(devices), figsize=(6 * len(devices), 4.5), squeeze=False, sharey=True)
    for ax, device in zip(axes[0], devices):
        for (dev, n, k, backend), pts in sorted(series.items()):
            if dev != device:
                continue
            pts.sort()
            ax.plot([d for d, _ in pts], [x for _, x in pts], marker="o", label=f"{backend} N={n} K={k}")
        if target:
            ax.axhline(target, color="k", linewidth=0.8, linestyle="--", label=f"target {target:g}x")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("code width D")
        ax.set_title(device, fontsize=9)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("speed-up over the baseline (same run)")
    fig.suptitle(", ".join(sorted({r["group"] for r in rows})), fontsize=10)
    return _save(fig, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json files")
    ap.add_argument("--out", help="PNG to write (needs matplotlib)")
    ap.add_argument("--grid", action="store_true",
                    help="--out draws speed-up against D per (N, K) instead of bars (N{n}-K{k}-D{d} shapes)")
    ap.add_argument("--target", type=float, default=None, help="with --grid: draw this speed-up as a line")
    ap.add_argument("--only", action="append", help="with --grid: plot only these backends (repeatable)")
    ap.add_argument("--md", help="Markdown table to write ('-' for stdout)")
    ap.add_argument("--baseline", action="append", metavar="[GROUP_GLOB=]BACKEND_GLOB",
                    help="baseline of the speed-ups (repeatable; default: torch); GROUP_GLOB= restricts it to "
                         "matching groups; a BACKEND_GLOB matching several backends takes the fastest")
    args = ap.parse_args(argv)
    baselines = parse_baselines(args.baseline)
    try:
        rows = load_rows(args.json)
        add_ratios(rows, baselines)
        table = markdown_table(rows, baselines)
        if args.md and args.md != "-":
            Path(args.md).parent.mkdir(parents=True, exist_ok=True)
            Path(args.md).write_text(table)
        if args.out:
            (plot_grid(rows, args.out, args.target, args.only) if args.grid else plot(rows, args.out, baselines))
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
