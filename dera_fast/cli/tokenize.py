"""``dera_fast tokenize``: a video file or folder -> a token file (.safetensors) with its provenance.

Videos are streamed: decoded frame by frame, resized as they are decoded, and tokenized a batch of clips at a
time, so memory stays flat in the video's length.
"""
from __future__ import annotations

import json
from pathlib import Path

from ._common import (CLIError, add_common_options, add_overwrite_option, load_tokenizer, model_files, output_path,
                      positive_float, positive_int, resolve_device, resolve_dtype, warn_ignored)


def add_parser(sub) -> None:
    p = sub.add_parser("tokenize", help="video file or folder -> token file (.safetensors)")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--model", required=True, help="tokenizer folder")
    p.add_argument("--stride", type=positive_int, default=None, help="frames between clip starts (default: clip length)")
    p.add_argument("--fps", type=positive_float, default=None, help="resample to this frame rate (default: native)")
    p.add_argument("--label", type=int, default=None,
                   help="class id stored for a single input file (default -1; a folder's labels are its subfolders)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    add_overwrite_option(p)
    add_common_options(p)
    p.set_defaults(func=run)


_VIDEO_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total} videos [{elapsed}<{remaining}{postfix}]"


def _done(stream, per_video: bool, finished: bool = False) -> float:
    """How far the job's bar has got in this file: frames read, or (a folder) the fraction of this video read."""
    if not per_video:
        return stream.frames_read
    if finished or not stream.expected_frames:
        return float(finished)
    return min(stream.frames_read / stream.expected_frames, 0.999)


def run(args) -> int:
    import torch
    from dera_fast._progress import progress_bar

    from dera_fast.data import VideoFolderDataset, iter_clips
    from dera_fast.train.tokens import save_tokens, tokenizer_provenance

    out = output_path(args.output, inputs=[args.input, *model_files(args.model)], overwrite=args.overwrite)
    device = resolve_device(args)
    dtype = resolve_dtype(args, device)
    model = load_tokenizer(args.model, device).to(dtype)
    cfg, clip_len = model.config, model.frames_per_clip
    src = Path(args.input)
    if src.is_dir():
        ds = VideoFolderDataset(src, frames=clip_len, size=cfg.size, index=False)  # listing and labels only
        files, labels, classes = ds.paths, ds.labels, ds.classes
        warn_ignored(["--label"] if args.label is not None else [],
                     "a folder's labels come from its class subfolders")
    elif src.is_file():
        files, labels, classes = [src], [-1 if args.label is None else args.label], []
    else:
        raise CLIError(f"input not found: {src}")
    stride = args.stride or clip_len
    all_ids, all_labels, starts = [], [], []
    # One bar for the whole job, with a known total from the start: a folder counts videos (advancing by the
    # fraction of each video read, so a long one still moves it), a single file counts its frames.
    per_video = len(files) > 1
    bar = progress_bar(total=len(files) if per_video else None, unit="video" if per_video else "frame",
                       desc="tokenize", progress=False if args.no_progress else None,
                       bar_format=_VIDEO_BAR if per_video else None)
    try:
        for path, label in zip(files, labels):
            stream = iter_clips(path, clip_len, stride, size=cfg.size, fps=args.fps, value_range=cfg.pixel_range)
            if not per_video and stream.expected_frames:
                bar.total = stream.expected_frames
            bar.set_postfix_str(path.name)
            shown, clips = 0, 0
            for _, ids in model.encode_stream(stream, args.batch_size, progress=False):
                all_ids.append(ids)
                clips += ids.shape[0]
                bar.update(_done(stream, per_video) - shown)
                shown = _done(stream, per_video)
            bar.update(_done(stream, per_video, finished=True) - shown)
            all_labels += [label] * clips
            starts += [i * stride for i in range(clips)]
    finally:
        bar.close()
    if not all_ids:
        raise CLIError(f"no clips in {src}")
    tokens = torch.cat(all_ids)
    meta = {"source": src.name, "fps": args.fps or "native", "clip_len": clip_len, "stride": stride,
            "size": cfg.size, **tokenizer_provenance(model), "device": device.type, "dtype": str(dtype),
            "backend": args.backend, "num_clips": tokens.shape[0]}
    if classes:
        meta.update(num_classes=len(classes), classes=json.dumps(classes))
    save_tokens(out, tokens, codebook_size=model.codebook_size, labels=torch.tensor(all_labels),
                starts=torch.tensor(starts), meta=meta)
    print(f"wrote {tokens.shape[0]} clips x {tokens.shape[1]} tokens to {args.output}")
    return 0
