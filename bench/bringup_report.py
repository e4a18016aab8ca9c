"""Collect a bench/gpu_bringup.sh run into results.json, table.md and plot.png, and print the head-line ratios.

    python bench/bringup_report.py --work WORKDIR [--results DIR] [--out DIR] [--dry-run]

WORKDIR holds what the script's steps wrote: selftest.json, bench_*.json (pytest-benchmark), tests.xml (JUnit),
steps.tsv (step, exit code, seconds). results.json = {"meta": machine and versions (GPU name, driver, torch, CUDA,
Triton, nvcc, Python, build record, git sha), "steps": [...], "tests": {...}, "selftest": [records],
"benchmarks": [pytest-benchmark records]}; bench/plot_bench.py reads it like any pytest-benchmark file.
Speed-ups are computed from the recorded times (plot_bench.add_ratios), with these baselines: LARP's naive path for
the VQ groups, the fastest SDPA backend for attention, the torch path elsewhere.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plot_bench  # noqa: E402

BASELINES = plot_bench.parse_baselines(["torch", "vq_nearest=naive", "vq_sample=naive",
                                        "codebook_cross_entropy=naive", "attention=sdpa-*"])
FILES = ("results.json", "table.md", "plot.png")


def _cmd(*args: str) -> str | None:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_meta() -> dict:
    import torch

    from dera_fast import backends

    info = backends.info()
    nvcc = _cmd("nvcc", "--version")
    return {
        "gpu": info["gpu"], "gpu_capability": info["gpu_capability"],
        "driver": _cmd("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
        "torch": info["torch"], "cuda": info["torch_cuda"], "triton": info["triton"],
        "triton_error": info["triton_error"], "nvcc": (re.findall(r"release ([\d.]+)", nvcc or "") or [None])[0],
        "python": info["python"], "extension_loaded": info["extension_loaded"],
        "extension_error": info["extension_error"], "build": info["build"],
        "git_sha": _cmd("git", "rev-parse", "--short", "HEAD"), "cpu_threads": torch.get_num_threads(),
    }


def _tests(xml: Path) -> dict | None:
    if not xml.is_file():
        return None
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} if suite is not None else None


def _selftest_rows(records: list[dict]) -> list[dict]:
    """Selftest rows with a time, as plot_bench rows (one panel per op, ratio vs the torch path, same run)."""
    rows = []
    for r in records:
        if r.get("ms"):
            rows.append({"group": f"selftest {r['op']}", "shape": f"{r['variant']} {r['shape']}",
                         "backend": r["backend"], "ms": r["ms"], "value": 1e3 / r["ms"], "unit": "calls/s",
                         "device": r["device"], "ratio": r.get("speedup"), "baseline_ms": None,
                         "own_baseline": None})
    return rows


def _selftest_md(records: list[dict]) -> str:
    lines = ["| op | variant | backend | device | shape | dtype | max err | tol | status | ms | torch ms | speed-up |",
             "|---|---|---|---|---|---|---:|---:|---|---:|---:|---:|"]
    for r in records:
        f = (lambda v, fmt: "-" if v is None else format(v, fmt))  # noqa: E731
        lines.append(f"| {r['op']} | {r['variant']} | {r['backend']} | {r['device']} | {r['shape']} | {r['dtype']} | "
                     f"{f(r['max_err'], '.2e')} | {f(r['tol'], '.1e')} | {r['status']} | {f(r['ms'], '.3g')} | "
                     f"{f(r['torch_ms'], '.3g')} | {f(r.get('speedup'), '.2f')} |")
    return "\n".join(lines) + "\n"


def headlines(bench_rows: list[dict], selftest: list[dict]) -> list[str]:
    """Per group and backend: the geometric mean (and range) of the speed-ups over the group's baseline."""
    out = []
    by_key: dict = {}
    for r in bench_rows:
        if r["ratio"]:
            by_key.setdefault((r["group"], r["backend"]), []).append(r["ratio"])
    for (group, backend), ratios in sorted(by_key.items()):
        base = plot_bench.baseline_of(group, BASELINES)
        if base and plot_bench.fnmatch.fnmatchcase(backend, base):
            continue
        gm = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
        out.append(f"{group:28s} {backend:10s} {gm:6.2f}x vs {base} (geo-mean of {len(ratios)} shapes, "
                   f"{min(ratios):.2f}x .. {max(ratios):.2f}x)")
    counts = {s: sum(r["status"] == s for r in selftest) for s in ("pass", "fail", "skip")}
    out.append(f"selftest: {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    meta = machine_meta()
    meta["dry_run"] = args.dry_run
    slug = re.sub(r"[^a-z0-9]+", "-", (meta["gpu"] or "cpu").lower()).strip("-")
    results = args.results or (args.work / "results" if args.dry_run else Path("bench/results") / slug)
    selftest = []
    if (args.work / "selftest.json").is_file():
        selftest = json.loads((args.work / "selftest.json").read_text())["records"]
    benchmarks = []
    for path in sorted(args.work.glob("bench_*.json")):
        try:
            benchmarks += json.loads(path.read_text())["benchmarks"]
        except (json.JSONDecodeError, KeyError) as e:
            print(f"skipping {path.name}: {e}", file=sys.stderr)
    steps = []
    if (args.work / "steps.tsv").is_file():
        for line in (args.work / "steps.tsv").read_text().splitlines():
            name, rc, secs = line.split("\t")
            steps.append({"step": name, "exit": rc, "seconds": int(secs)})
    results.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "steps": steps, "tests": _tests(args.work / "tests.xml"), "selftest": selftest,
               "benchmarks": benchmarks}
    (results / "results.json").write_text(json.dumps(payload, indent=1, default=str))
    rows = []
    if benchmarks:
        rows = plot_bench.load_rows([results / "results.json"])
        plot_bench.add_ratios(rows, BASELINES)
    header = (f"# GPU bring-up: {meta['gpu'] or 'CPU (dry run)'}\n\ndriver {meta['driver']}, torch {meta['torch']} "
              f"(CUDA {meta['cuda']}), Triton {meta['triton']}, nvcc {meta['nvcc']}, Python {meta['python']}, "
              f"git {meta['git_sha']}\n\nsteps: " + ", ".join(f"{s['step']} {s['exit']} ({s['seconds']} s)"
                                                            for s in steps) + "\n")
    table = header + "\n## selftest\n\n" + _selftest_md(selftest)
    if rows:
        table += "\n## benchmarks\n\n" + plot_bench.markdown_table(rows, BASELINES)
    (results / "table.md").write_text(table)
    plot_rows = rows + _selftest_rows(selftest)
    try:
        if plot_rows:
            plot_bench.plot(plot_rows, results / "plot.png", BASELINES)
    except ImportError as e:
        print(f"no plot: {e}", file=sys.stderr)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            if (results / name).is_file():
                shutil.copy2(results / name, args.out / name)
    print(f"results in {results}" + (f" (copied to {args.out})" if args.out else ""))
    print("\nhead-line ratios (from the recorded times):")
    for line in headlines(rows, selftest):
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
