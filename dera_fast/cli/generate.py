"""``dera_fast generate``: sample clips with a trained generator (class-conditional or frame prediction)."""
from __future__ import annotations

from pathlib import Path

from ._common import CLIError, add_common_options, load_tokenizer, read_clip_video, resolve_device


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="sample clips with a trained generator")
    p.add_argument("output", help=".mp4, .gif or .png (one row per class)")
    p.add_argument("--model", required=True, help="generator folder")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder")
    cond = p.add_mutually_exclusive_group(required=True)
    cond.add_argument("--class", dest="class_ids", type=int, nargs="+", help="class id(s)")
    cond.add_argument("--context", default=None, help="context video (frame-prediction generators)")
    p.add_argument("--context-frames", type=int, default=5)
    p.add_argument("--num", type=int, default=4, help="samples per class / context")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=float, default=8.0)
    add_common_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from dera_fast import viz
    from dera_fast.generate import generate
    from dera_fast.models.ar import ARGenerator

    device = resolve_device(args)
    if not (Path(args.model) / "model.safetensors").is_file():
        raise CLIError(f"--model {args.model}: no model.safetensors there (expected a generator folder)")
    gen = ARGenerator.from_pretrained(args.model, device=device)
    tok = load_tokenizer(args.tokenizer, device)
    gcfg = gen.config
    if gcfg.vocab_size != tok.codebook_size or gcfg.max_seq_len != tok.tokens_per_clip:
        raise CLIError(f"generator ({gcfg.max_seq_len} tokens over {gcfg.vocab_size} codes) does not match the "
                       f"tokenizer ({tok.tokens_per_clip} over {tok.codebook_size})")
    kw = dict(cfg_scale=args.cfg, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
              tokenizer=tok, return_video=True, progress=not args.no_progress)
    if args.context is not None:
        if not gcfg.frame_prediction:
            raise CLIError("this generator is class-conditional: use --class N")
        video = read_clip_video(args.context, tok, None)[:, : args.context_frames]
        reps = -(-tok.frames_per_clip // video.shape[1])
        ctx = video.repeat_interleave(reps, dim=1)[:, : tok.frames_per_clip]  # LARP: context frames stretched
        ctx_ids = tok.encode(ctx[None].to(device)).repeat(args.num, 1)
        res = generate(gen, context_ids=ctx_ids, **kw)
        labels = torch.zeros(args.num, dtype=torch.long)
    else:
        if gcfg.frame_prediction:
            raise CLIError("this generator predicts frames: use --context in.mp4")
        bad = [c for c in args.class_ids if not 0 <= c < gcfg.num_classes]
        if bad:
            raise CLIError(f"--class {bad[0]} is out of range: the generator has {gcfg.num_classes} classes")
        labels = torch.tensor(args.class_ids).repeat_interleave(args.num)
        res = generate(gen, class_labels=labels.to(device), **kw)
    video = res.video.float().cpu().clamp(*tok.config.pixel_range)
    viz.save_video_grid(viz.samples_grid(video, labels, value_range=tok.config.pixel_range), args.output,
                        args.fps, value_range=tok.config.pixel_range)
    print(f"wrote {video.shape[0]} samples to {args.output} ({res.stats['tokens_per_s']:.0f} tokens/s)")
    return 0
