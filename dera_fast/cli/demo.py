"""``dera_fast demo``: train a small DeRA tokenizer and generator on a CPU in minutes, with pictures."""
from __future__ import annotations

from ._common import add_common_options, resolve_device


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train a tiny DeRA tokenizer and generator on synthetic clips (CPU, minutes)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, default=None, help="tokenizer steps (default: the demo's)")
    p.add_argument("--gen-steps", type=int, default=None, help="generator steps (default: the demo's)")
    p.add_argument("--teacher-image", default=None, help="local image-teacher weights (default: random teacher)")
    p.add_argument("--teacher-video", default=None, help="local video-teacher weights (default: random teacher)")
    p.add_argument("--perceptual-weights", default=None, help="local VGG16 .safetensors (default: no LPIPS)")
    add_common_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from dera_fast.demo import run_demo

    if args.threads is None:
        # NOTE: the demo's tensors are tiny; one thread is as fast on an idle 2-core CPU and far faster when the
        # cores are shared (OpenMP threads spin-wait on busy cores).
        torch.set_num_threads(1)
    run_demo(out=args.out, steps=args.steps, gen_steps=args.gen_steps, device=str(resolve_device(args)),
             progress=not args.no_progress, teacher_image=args.teacher_image, teacher_video=args.teacher_video,
             perceptual_weights=args.perceptual_weights)
    return 0
