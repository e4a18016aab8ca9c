"""``dera_fast tokenize``: a video file or folder -> a token file (.safetensors) with its provenance."""
from __future__ import annotations

import json
from pathlib import Path

from ._common import CLIError, add_common_options, load_tokenizer, read_clip_video, resolve_device, resolve_dtype


def add_parser(sub) -> None:
    p = sub.add_parser("tokenize", help="video file or folder -> token file (.safetensors)")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--model", required=True, help="tokenizer folder")
    p.add_argument("--stride", type=int, default=None, help="frames between clip starts (default: clip length)")
    p.add_argument("--fps", type=float, default=None, help="resample to this frame rate (default: native)")
    p.add_argument("--label", type=int, default=-1, help="class id stored for a single input file")
    p.add_argument("--batch-size", type=int, default=8)
    add_common_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from dera_fast.data import VideoFolderDataset
    from dera_fast.train.tokens import config_hash, save_tokens

    device = resolve_device(args)
    dtype = resolve_dtype(args, device)
    model = load_tokenizer(args.model, device).to(dtype)
    src = Path(args.input)
    if src.is_dir():
        ds = VideoFolderDataset(src, frames=model.frames_per_clip, size=model.config.size)
        files, labels, classes = ds.paths, ds.labels, ds.classes
    elif src.is_file():
        files, labels, classes = [src], [args.label], []
    else:
        raise CLIError(f"input not found: {src}")
    stride = args.stride or model.frames_per_clip
    all_ids, all_labels, starts = [], [], []
    for path, label in zip(files, labels):
        video = read_clip_video(path, model, args.fps).to(dtype)
        ids = model.encode_video(video, stride=stride, batch_size=args.batch_size, progress=not args.no_progress)
        all_ids.append(ids)
        all_labels += [label] * ids.shape[0]
        starts += [i * stride for i in range(ids.shape[0])]
    tokens = torch.cat(all_ids)
    meta = {"source": src.name, "fps": args.fps or "native", "clip_len": model.frames_per_clip, "stride": stride,
            "size": model.config.size, "tokenizer_config_hash": config_hash(model.config.to_dict()),
            "model_type": model.model_type, "device": device.type, "dtype": str(dtype),
            "backend": args.backend, "num_clips": tokens.shape[0]}
    if classes:
        meta.update(num_classes=len(classes), classes=json.dumps(classes))
    save_tokens(args.output, tokens, codebook_size=model.codebook_size, labels=torch.tensor(all_labels),
                starts=torch.tensor(starts), meta=meta)
    print(f"wrote {tokens.shape[0]} clips x {tokens.shape[1]} tokens to {args.output}")
    return 0
