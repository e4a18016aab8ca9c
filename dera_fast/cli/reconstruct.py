"""``dera_fast reconstruct``: a video or token file -> the reconstructed video."""
from __future__ import annotations

from pathlib import Path

from ._common import CLIError, add_common_options, load_tokenizer, read_clip_video, resolve_device, resolve_dtype


def add_parser(sub) -> None:
    p = sub.add_parser("reconstruct", help="video or token file -> reconstructed video")
    p.add_argument("input", help="video file or token file (.safetensors)")
    p.add_argument("output", help=".mp4, .gif or .png")
    p.add_argument("--model", required=True, help="tokenizer folder")
    p.add_argument("--side-by-side", action="store_true", help="input and reconstruction in one video")
    p.add_argument("--metrics", action="store_true", help="print PSNR and SSIM")
    p.add_argument("--fps", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    add_common_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from dera_fast import metrics, viz
    from dera_fast.data import write_video
    from dera_fast.train.tokens import load_tokens

    device = resolve_device(args)
    dtype = resolve_dtype(args, device)
    model = load_tokenizer(args.model, device).to(dtype)
    src = Path(args.input)
    if not src.is_file():
        raise CLIError(f"input not found: {src}")
    cfg, fps = model.config, args.fps or 8.0
    if src.suffix == ".safetensors":
        ids, _, meta = load_tokens(src)
        if ids.shape[1] != model.tokens_per_clip or int(meta["codebook_size"]) != model.codebook_size:
            raise CLIError(f"{src} holds {ids.shape[1]}-token clips over {meta['codebook_size']} codes; "
                           f"the model expects {model.tokens_per_clip} over {model.codebook_size}")
        video = None
        clips = torch.cat([model.decode(ids[i:i + args.batch_size]).float().cpu()
                           for i in range(0, ids.shape[0], args.batch_size)])
        fps = args.fps or (float(meta["fps"]) if meta.get("fps", "native") != "native" else 8.0)
    else:
        video = read_clip_video(src, model, args.fps)
        ids = model.encode_video(video.to(dtype), batch_size=args.batch_size, progress=not args.no_progress)
        clips = torch.cat([model.decode(ids[i:i + args.batch_size]).float().cpu()
                           for i in range(0, ids.shape[0], args.batch_size)])
    recon = clips.clamp(*cfg.pixel_range).permute(1, 0, 2, 3, 4).flatten(1, 2)  # [3, N*T, S, S]
    if video is not None:  # trailing frames that fill no clip are dropped; a short video was padded
        recon = recon[:, : video.shape[1]]
        video = video[:, : recon.shape[1]]
    if args.metrics and video is not None:
        x, y = video[None].float(), recon[None]
        print(f"PSNR {float(metrics.psnr(x, y, value_range=cfg.pixel_range)):.2f} dB  "
              f"SSIM {float(metrics.ssim(x, y, value_range=cfg.pixel_range)):.4f}")
    if args.side_by_side and video is not None:
        viz.save_video_grid([video[None].float(), recon[None]], args.output, fps, value_range=cfg.pixel_range)
    else:
        write_video(args.output, recon, fps, value_range=cfg.pixel_range)
    print(f"wrote {args.output}")
    return 0
