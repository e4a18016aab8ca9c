"""``dera_fast generate``: sample clips with a trained generator (class-conditional or frame prediction)."""
from __future__ import annotations

from pathlib import Path

from ._common import (CLIError, add_common_options, add_overwrite_option, add_provenance_option,
                      check_token_provenance, finite_float, load_tokenizer, model_files, non_negative_int,
                      positive_float, positive_int, probability, read_clip_video, resolve_device, video_output,
                      warn_ignored)


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="sample clips with a trained generator")
    p.add_argument("output", help=".mp4, .gif or .png (one row per class)")
    p.add_argument("--model", required=True, help="generator folder")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder")
    cond = p.add_mutually_exclusive_group(required=True)
    cond.add_argument("--class", dest="class_ids", type=non_negative_int, nargs="+", help="class id(s)")
    cond.add_argument("--context", default=None, help="context video (frame-prediction generators)")
    p.add_argument("--context-frames", type=positive_int, default=None, help="frames of --context given (default 5)")
    p.add_argument("--num", type=positive_int, default=4, help="samples per class / context")
    p.add_argument("--cfg", type=finite_float, default=1.0, help="classifier-free guidance scale")
    p.add_argument("--temperature", type=positive_float, default=1.0)
    p.add_argument("--top-k", type=non_negative_int, default=0, help="0 = off")
    p.add_argument("--top-p", type=probability, default=1.0, help="in (0, 1]; 1 = off")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--fps", type=positive_float, default=None, help="frame rate of an .mp4 / .gif output (default 8)")
    add_provenance_option(p, "sample even if the generator was trained on another tokenizer's tokens")
    add_overwrite_option(p)
    add_common_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from dera_fast import viz
    from dera_fast.generate import generate
    from dera_fast.models.ar import ARGenerator
    from dera_fast.models.pretrained import read_header

    out = video_output(args.output, inputs=[*model_files(args.model), *model_files(args.tokenizer), args.context],
                       overwrite=args.overwrite)
    if args.context is not None and not Path(args.context).is_file():
        raise CLIError(f"--context {args.context}: file not found")
    device = resolve_device(args)
    if not Path(args.model).is_dir() or not (Path(args.model) / "model.safetensors").is_file():
        raise CLIError(f"--model {args.model}: no model.safetensors there (expected a generator folder)")
    header = read_header(args.model)
    if header["model_type"] != ARGenerator.model_type:
        raise CLIError(f"--model {args.model} holds a {header['model_type']!r} model, not a generator")
    gen = ARGenerator.from_pretrained(args.model, device=device)
    tok = load_tokenizer(args.tokenizer, device)
    gcfg = gen.config
    if gcfg.vocab_size != tok.codebook_size or gcfg.max_seq_len != tok.tokens_per_clip:
        raise CLIError(f"generator ({gcfg.max_seq_len} tokens over {gcfg.vocab_size} codes) does not match the "
                       f"tokenizer ({tok.tokens_per_clip} over {tok.codebook_size})")
    check_token_provenance(header.get("tokenizer") or {}, tok, source=f"generator {args.model}",
                           ignore=args.ignore_provenance)
    kw = dict(cfg_scale=args.cfg, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
              tokenizer=tok, return_video=True, progress=False if args.no_progress else None)
    if args.context is not None:
        if not gcfg.frame_prediction:
            raise CLIError("this generator is class-conditional: use --class N")
        frames = args.context_frames or 5
        if frames >= tok.frames_per_clip:
            raise CLIError(f"--context-frames must be below the tokenizer's {tok.frames_per_clip} frames per clip")
        video = read_clip_video(args.context, tok, None, frames=frames)  # decodes only these frames
        from dera_fast.data import repeat_last_frame  # LARP's repeat_to_m_frames: the last context frame repeated
        ctx = repeat_last_frame(video, tok.frames_per_clip)[:, : tok.frames_per_clip]
        ctx_ids = tok.encode(ctx[None].to(device)).repeat(args.num, 1)
        res = generate(gen, context_ids=ctx_ids, **kw)
        labels = torch.zeros(args.num, dtype=torch.long)
    else:
        if gcfg.frame_prediction:
            raise CLIError("this generator predicts frames: use --context in.mp4")
        warn_ignored(["--context-frames"] if args.context_frames is not None else [],
                     "the generator is class-conditional (it takes no context)")
        bad = [c for c in args.class_ids if not 0 <= c < gcfg.num_classes]
        if bad:
            raise CLIError(f"--class {bad[0]} is out of range: the generator has {gcfg.num_classes} classes")
        labels = torch.tensor(args.class_ids).repeat_interleave(args.num)
        res = generate(gen, class_labels=labels.to(device), **kw)
    video = res.video.float().cpu().clamp(*tok.config.pixel_range)
    if out.suffix.lower() == ".png":
        warn_ignored(["--fps"] if args.fps is not None else [], "a .png output is a still strip of frames")
    viz.save_video_grid(viz.samples_grid(video, labels, value_range=tok.config.pixel_range), out,
                        args.fps or 8.0, value_range=tok.config.pixel_range)
    print(f"wrote {video.shape[0]} samples to {out} ({res.stats['tokens_per_s']:.0f} tokens/s)")
    return 0
