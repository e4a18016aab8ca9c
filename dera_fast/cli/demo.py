"""``dera_fast demo``: train a small DeRA tokenizer and generator on a CPU in minutes, with pictures."""
from __future__ import annotations

from pathlib import Path

from ._common import CLIError, add_common_options, add_overwrite_option, output_path, positive_int, resolve_device


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train a tiny DeRA tokenizer and generator on synthetic clips (CPU, minutes)")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--steps", type=positive_int, default=None, help="tokenizer steps (default: the demo's)")
    p.add_argument("--gen-steps", type=positive_int, default=None, help="generator steps (default: the demo's)")
    p.add_argument("--teacher-image", default=None, help="local image-teacher weights (default: random teacher)")
    p.add_argument("--teacher-video", default=None, help="local video-teacher weights (default: random teacher)")
    p.add_argument("--perceptual-weights", default=None, help="local VGG16 .safetensors (default: no LPIPS)")
    add_overwrite_option(p)
    add_common_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from dera_fast.demo import run_demo

    inputs = [args.teacher_image, args.teacher_video, args.perceptual_weights]
    out = output_path(args.out, kind="dir", overwrite=True, inputs=inputs, what="--out")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise CLIError(f"--out {out} is not empty (pass --overwrite to replace the demo's outputs in it)")
    for flag, path in (("--teacher-image", args.teacher_image), ("--teacher-video", args.teacher_video),
                       ("--perceptual-weights", args.perceptual_weights)):
        if path is not None and not Path(path).exists():
            raise CLIError(f"{flag} {path}: not found")
    if args.threads is None:
        # NOTE: the demo's tensors are tiny; one thread is as fast on an idle 2-core CPU and far faster when the
        # cores are shared (OpenMP threads spin-wait on busy cores).
        torch.set_num_threads(1)
    run_demo(out=out, steps=args.steps, gen_steps=args.gen_steps, device=str(resolve_device(args)),
             progress=False if args.no_progress else None, teacher_image=args.teacher_image,
             teacher_video=args.teacher_video, perceptual_weights=args.perceptual_weights)
    return 0
