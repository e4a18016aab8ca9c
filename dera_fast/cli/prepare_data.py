"""``dera_fast prepare-data SRC DST --size 128``: transcode a video folder or a LARP CSV for fast training.

Every video becomes H.264 with its short side at ``--size`` (the protocol's torch resize, aspect kept) and a
keyframe every ``--keyint`` frames (default 16, LARP's clip length), so a random 16-frame clip costs one short
seek and small frames: pre-resized clips load more than 10x faster than 640x360 Kinetics files
(``bench/bench_data.py``). The folder layout is kept (``a/b.avi`` -> ``DST/a/b.mp4``) and a matching LARP CSV is
written to DST. Writes are atomic (temporary file, then rename); a rerun skips outputs that are complete (same frame
count as the source, right size) and removes temporary files left by killed runs. DST may not be SRC, lie inside it
or contain it.
"""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from ._common import CLIError, warn_ignored

_TMP = re.compile(r"^\..+\.tmp(\d+)\.mp4$")  # VideoWriter's temporary names: .<stem>.tmp<pid>.mp4


def add_parser(sub) -> None:
    p = sub.add_parser("prepare-data", help="transcode a video folder or LARP CSV to small H.264 for training")
    p.add_argument("src", help="a folder of videos (searched recursively) or a LARP CSV (id,path,action,label)")
    p.add_argument("dst", help="output folder (not inside SRC)")
    p.add_argument("--size", type=int, default=128, help="short side in pixels (default 128)")
    p.add_argument("--keyint", type=int, default=16, help="frames between keyframes (default 16, the clip length)")
    p.add_argument("--crf", type=int, default=18, help="H.264 quality (lower is better; default 18)")
    p.add_argument("--root", default=None, help="base folder of relative CSV paths (default: the CSV's folder)")
    p.add_argument("--workers", type=int, default=None, help="parallel processes (default: the CPU cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def _entries(src: Path, root: Path | None):
    """``(source path, output path relative to DST, CSV row or None)`` for every video, plus the CSV header."""
    from dera_fast.data.datasets import _action_from_path, read_larp_csv
    from dera_fast.data.decode import VIDEO_SUFFIXES

    if src.suffix.lower() == ".csv":
        base = root or src.parent
        read_larp_csv(src, base)  # validates the header and paths column
        with open(src, newline="") as f:
            reader = csv.DictReader(f)
            header = [c.strip() for c in reader.fieldnames]
            rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
        out = []
        for row in rows:
            p = Path(row["path"])
            p = p if p.is_absolute() else base / p
            rel = p.relative_to(base) if _inside(p.resolve(), base.resolve()) else Path(*p.resolve().parts[1:])
            out.append((p, rel.with_suffix(".mp4"), row))
        return out, header, base
    if not src.is_dir():
        raise CLIError(f"SRC must be a folder or a .csv file: {src}")
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    if not files:
        raise CLIError(f"no video files ({', '.join(VIDEO_SUFFIXES)}) under {src}")
    actions = [_action_from_path(p, src) for p in files]
    classes = {a: i for i, a in enumerate(sorted({a for a in actions if a is not None}))}
    out = [(p, p.relative_to(src).with_suffix(".mp4"),
            {"id": str(i), "path": "", "action": a or "", "label": str(classes[a]) if a is not None else ""})
           for i, (p, a) in enumerate(zip(files, actions))]
    return out, ["id", "path", "action", "label"], src


def _frame_count(path: Path) -> int:
    from dera_fast.data.decode import open_video

    with open_video(path, threads=1) as s:
        return s.num_frames()


def _complete(src: Path, out: Path, size: int) -> bool:
    """A finished output: opens, has the source's frame count, short side ``size`` (rounded up to even)."""
    if not out.is_file():
        return False
    try:
        from dera_fast.data.decode import open_video

        with open_video(out, threads=1) as o:
            if min(o.size()) not in (size, size + size % 2) or o.recorded_frames <= 0:
                return False
            n = o.recorded_frames
        return n == _frame_count(src)
    except (ValueError, OSError):
        return False


def transcode(src: Path, out: Path, size: int, keyint: int, crf: int) -> int:
    """Decode ``src`` frame by frame, resize (exact protocol path), write H.264 to ``out`` atomically; returns the
    number of frames."""
    import torch

    from dera_fast.data.decode import open_video
    from dera_fast.data.transforms import FrameResizer, frames_to_clip
    from dera_fast.data.writer import VideoWriter

    torch.set_num_threads(1)
    with open_video(src, threads=1) as source:
        h, w = source.size()
        shape = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)  # torchvision's Resize
        resizer = FrameResizer(shape, "exact")
        n, chunk = 0, []
        with VideoWriter(out, source.fps or 25.0, value_range=(0, 1), crf=crf, keyint=keyint, threads=1) as writer:
            for _, frame in source.decode():
                chunk.append(resizer(frame))
                if len(chunk) == 16:
                    writer.write(frames_to_clip(chunk))
                    n, chunk = n + len(chunk), []
            if chunk:
                writer.write(frames_to_clip(chunk))
                n += len(chunk)
    return n


def _job(args):
    src, out, size, keyint, crf = args
    try:
        if _complete(src, out, size):
            return "skipped", None
        transcode(src, out, size, keyint, crf)
        return "done", None
    except (ValueError, OSError) as e:
        return "failed", f"{src}: {e}"


def _clean_stale(dst: Path) -> int:
    """Remove temporary files that killed runs left in DST (their process is gone)."""
    removed = 0
    for p in dst.rglob(".*.tmp*.mp4"):
        m = _TMP.match(p.name)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # that process still runs
        except ProcessLookupError:
            p.unlink(missing_ok=True)
            removed += 1
        except PermissionError:
            continue
    return removed


def _write_csv(path: Path, header: list[str], rows: list[dict]) -> None:
    from dera_fast._files import write_file

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)

    write_file(path, write)  # temporary name, fsync, rename


def run(args) -> int:
    from concurrent.futures import ProcessPoolExecutor

    from dera_fast._progress import progress_bar

    from dera_fast.data.decode import require_av

    for name, v, low in (("--size", args.size, 8), ("--keyint", args.keyint, 1)):
        if v < low:
            raise CLIError(f"{name} must be >= {low}, got {v}")
    if not 0 <= args.crf <= 51:
        raise CLIError(f"--crf must be in [0, 51], got {args.crf}")
    if args.workers is not None and args.workers <= 0:
        raise CLIError(f"--workers must be positive, got {args.workers}")
    require_av()
    src, dst = Path(args.src), Path(args.dst)
    if not src.exists():
        raise CLIError(f"SRC not found: {src}")
    if dst.exists() and not dst.is_dir():
        raise CLIError(f"DST exists and is not a folder: {dst}")
    if args.root and src.suffix.lower() != ".csv":
        warn_ignored(["--root"], "it resolves the relative paths of a CSV, and SRC is a folder")
    entries, header, base = _entries(src, Path(args.root) if args.root else None)
    base_r, dst_r = base.resolve(), dst.resolve()
    if _inside(dst_r, base_r) or _inside(base_r, dst_r):
        raise CLIError(f"DST {dst} overlaps SRC {base}: it may not be SRC, lie inside it or contain it "
                       f"(outputs must never replace or mix with inputs)")
    outs = {}
    for p, rel, _ in entries:
        if rel in outs:
            raise CLIError(f"{p} and {outs[rel]} would both become {dst / rel}")
        outs[rel] = p
    dst.mkdir(parents=True, exist_ok=True)
    stale = _clean_stale(dst)
    jobs = [(p, dst / rel, args.size, args.keyint, args.crf) for p, rel, _ in entries]
    workers = min(args.workers or os.cpu_count() or 1, len(jobs))
    counts = {"done": 0, "skipped": 0, "failed": 0}
    failures, ok = [], []
    bar = progress_bar(total=len(jobs), unit="video", desc="prepare-data",
                       progress=False if args.no_progress else None)
    try:
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                results = list(_tracked(pool.map(_job, jobs), bar, counts))
        else:
            results = list(_tracked(map(_job, jobs), bar, counts))
    finally:
        bar.close()
    for (p, rel, row), (status, err) in zip(entries, results):
        if status == "failed":
            failures.append(err)
        else:
            ok.append({**row, "path": rel.as_posix()})
    name = src.name if src.suffix.lower() == ".csv" else f"{src.resolve().name}.csv"
    if ok:
        _write_csv(dst / name, header, ok)
    print(f"{counts['done']} transcoded, {counts['skipped']} already complete, {counts['failed']} failed"
          + (f", {stale} stale temporary files removed" if stale else "") + f"; CSV: {dst / name}")
    if failures:
        raise CLIError(f"{len(failures)} of {len(jobs)} videos failed (first: {failures[0]}); the CSV lists the "
                       f"others")
    return 0


def _tracked(results, bar, counts):
    for status, err in results:
        counts[status] += 1
        bar.update(1)
        bar.set_postfix(counts)
        yield status, err
