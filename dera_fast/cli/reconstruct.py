"""``dera_fast reconstruct``: a video or token file -> the reconstructed video.

Streams end to end: the input is decoded and tokenized a batch of clips at a time, each batch is decoded by the
model and its frames are written at once, and ``--metrics`` keeps running sums, so memory stays flat in the video's
length (for ``.mp4``; ``.gif`` / ``.png`` outputs hold their frames until the end).
"""
from __future__ import annotations

import math
from pathlib import Path

from ._common import (CLIError, add_common_options, add_overwrite_option, add_provenance_option,
                      check_token_provenance, load_tokenizer, log, model_files, positive_int, resolve_device,
                      resolve_dtype, video_output, warn_ignored)


def add_parser(sub) -> None:
    p = sub.add_parser("reconstruct", help="video or token file -> reconstructed video")
    p.add_argument("input", help="video file or token file (.safetensors)")
    p.add_argument("output", help=".mp4, .gif or .png")
    p.add_argument("--model", required=True, help="tokenizer folder")
    p.add_argument("--side-by-side", action="store_true", help="input above its reconstruction")
    p.add_argument("--metrics", action="store_true", help="print PSNR and SSIM")
    p.add_argument("--fps", type=float, default=None,
                   help="resample the input to this frame rate (default: native) and write at it")
    p.add_argument("--batch-size", type=positive_int, default=8)
    add_provenance_option(p, "decode a token file even if another tokenizer made it")
    add_overwrite_option(p)
    add_common_options(p)
    p.set_defaults(func=run)


class RunningMetrics:
    """PSNR and SSIM of a whole video from its clips: PSNR from the summed squared error (the same as over the
    whole video at once), SSIM as the frame-weighted mean of per-clip SSIMs (SSIM is a mean over frames)."""

    def __init__(self, value_range):
        self.value_range = value_range
        self.sse, self.count, self.ssim_sum, self.frames = 0.0, 0, 0.0, 0

    def update(self, x, y) -> None:
        """``x``, ``y``: float ``[3, T, H, W]`` (input, reconstruction)."""
        from dera_fast import metrics

        self.sse += float((x.double() - y.double()).pow(2).sum())
        self.count += x.numel()
        self.ssim_sum += float(metrics.ssim(x[None], y[None], value_range=self.value_range)) * x.shape[1]
        self.frames += x.shape[1]

    def summary(self) -> str:
        lo, hi = self.value_range
        mse = self.sse / max(self.count, 1)
        psnr = math.inf if mse == 0 else 10 * math.log10((hi - lo) ** 2 / mse)
        return f"PSNR {psnr:.2f} dB  SSIM {self.ssim_sum / max(self.frames, 1):.4f}"


def run(args) -> int:
    from dera_fast._progress import progress_bar

    from dera_fast import viz
    from dera_fast.data import VideoWriter, iter_clips
    from dera_fast.train.tokens import load_tokens

    if args.fps is not None and not (math.isfinite(args.fps) and args.fps > 0):
        raise CLIError(f"--fps must be a positive number, got {args.fps}")
    out = video_output(args.output, inputs=[args.input, *model_files(args.model)], overwrite=args.overwrite)
    device = resolve_device(args)
    dtype = resolve_dtype(args, device)
    model = load_tokenizer(args.model, device).to(dtype)
    src = Path(args.input)
    if not src.is_file():
        raise CLIError(f"input not found: {src}")
    cfg, clip_len, pixel_range = model.config, model.frames_per_clip, model.config.pixel_range

    def decoded(ids):  # [b, 3, T, S, S] float on the CPU, clamped to the pixel range
        return model.decode(ids).float().cpu().clamp(*pixel_range)

    bar = progress_bar(unit="frame", desc="reconstruct", progress=False if args.no_progress else None)
    try:
        if src.suffix == ".safetensors":
            if args.metrics or args.side_by_side:  # asked-for output that cannot exist: an error, not a warning
                raise CLIError("--metrics and --side-by-side need a video input (a token file has no pixels)")
            ids, _, meta = load_tokens(src)
            check_token_provenance(meta, model, source=str(src), ignore=args.ignore_provenance)
            if ids.shape[1] != model.tokens_per_clip or int(meta["codebook_size"]) != model.codebook_size:
                raise CLIError(f"{src} holds {ids.shape[1]}-token clips over {meta['codebook_size']} codes; "
                               f"the model expects {model.tokens_per_clip} over {model.codebook_size}")
            stride = int(meta.get("stride", clip_len))
            if stride != clip_len:
                log.warning("note: %s was tokenized with stride %d, not the clip length %d: its clips %s, and they "
                            "are written one after another, each in full", src, stride, clip_len,
                            "overlap" if stride < clip_len else "leave gaps")
            if out.suffix.lower() == ".png":
                warn_ignored(["--fps"] if args.fps else [], "a .png output is a still strip of frames")
            fps = args.fps or (float(meta["fps"]) if meta.get("fps", "native") != "native" else 8.0)
            bar.total = ids.shape[0] * clip_len
            with VideoWriter(out, fps, value_range=pixel_range) as writer:
                for i in range(0, ids.shape[0], args.batch_size):
                    for clip in decoded(ids[i:i + args.batch_size]):
                        writer.write(clip)
                        bar.update(clip.shape[1])
        else:
            stream = iter_clips(src, clip_len, size=cfg.size, fps=args.fps, value_range=pixel_range)
            bar.total = stream.expected_frames
            running = RunningMetrics(pixel_range) if args.metrics else None
            with VideoWriter(out, args.fps or stream.fps or 8.0, value_range=pixel_range) as writer:
                for clips, ids in model.encode_stream(stream, args.batch_size, progress=False):
                    for x, r in zip(clips, decoded(ids)):
                        # a video shorter than one clip was padded: keep its own frames only
                        keep = min(clip_len, stream.frames_read) if stream.padded else clip_len
                        x, r = x[:, :keep].float(), r[:, :keep]
                        if running is not None:
                            running.update(x, r)
                        writer.write(viz.video_grid([x[None], r[None]], value_range=pixel_range)
                                     if args.side_by_side else r)
                        bar.update(keep)
            if running is not None:
                bar.close()
                print(running.summary())
    finally:
        bar.close()
    print(f"wrote {out}")
    return 0
