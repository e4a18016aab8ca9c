"""Command line: ``python -m dera_fast <command>`` (also installed as ``dera-fast``).

Exit codes: 0 success, 2 bad arguments, 3 missing optional dependency.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


class CLIError(Exception):
    """A user mistake: reported as one line, exit code ``code``."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def _cmd_info(args: argparse.Namespace) -> int:
    from dera_fast import backends

    info = backends.info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    build = info["build"] or {}
    rows = [
        ("dera_fast", f"{info['dera_fast']} (git {build.get('git_sha', '?')})"),
        ("python", info["python"]),
        ("torch", f"{info['torch']} (CUDA {info['torch_cuda'] or 'none'})"),
        ("GPU", f"{info['gpu']} (sm_{(info['gpu_capability'] or '').replace('.', '')})" if info["gpu"] else "none"),
        ("triton", f"{info['triton'] or 'not installed'}"
                   + (" (TRITON_INTERPRET=1)" if info["triton_interpret"] else "")),
        ("extension", "loaded" if info["extension_loaded"] else f"not loaded: {info['extension_error']}"),
        ("  built", f"{build.get('ext_kind', '?')} for torch {build.get('torch_version')} "
                    f"(CUDA {build.get('torch_cuda') or 'none'}, arch {build.get('cuda_arch_list') or '-'}) "
                    f"at {build.get('built_at', '?')}"),
        ("  ops", ", ".join(f"{k}[{'/'.join(v)}]" for k, v in info["extension_ops"].items()) or "none"),
        ("backends (cpu)", ", ".join(info["backends_cpu"])),
        ("backends (cuda)", ", ".join(info["backends_cuda"]) or "no CUDA device"),
        ("DERA_FAST_BACKEND", info["env_backend"]),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


# ---------------------------------------------------------------------------------------------------- helpers
_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
           "fp16": "float16", "float16": "float16"}


def _device(args):
    from dera_fast.train.distributed import resolve_device

    try:
        return resolve_device(args.device)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _dtype(args, device):
    import torch

    if args.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, _DTYPES[args.dtype])


def load_tokenizer(directory, device="cpu"):
    """Load a LARP or DeRA tokenizer folder written by ``save_pretrained`` (eval mode)."""
    from dera_fast import models

    cfg_path = Path(directory) / "config.json"
    if not cfg_path.is_file():
        raise CLIError(f"--model/--tokenizer {directory}: no config.json there (expected a folder written by "
                       f"save_pretrained, e.g. <run>/model)")
    kind = json.loads(cfg_path.read_text()).get("model_type")
    classes = {"larp": models.LARPTokenizer, "dera": models.DeRATokenizer}
    if kind not in classes:
        raise CLIError(f"{directory} is not a tokenizer folder (model_type={kind!r})")
    return classes[kind].from_pretrained(directory, device=device)


def _read_clip_video(path, model, fps):
    from dera_fast.data import read_video

    cfg = model.config
    return read_video(path, size=cfg.size, fps=fps, value_range=cfg.pixel_range)  # [3, T, S, S]


# ---------------------------------------------------------------------------------------------------- commands
def _cmd_demo(args) -> int:
    import torch

    from dera_fast.demo import run_demo

    if args.threads is None:
        # NOTE: the demo's tensors are tiny; one thread is as fast on an idle 2-core CPU and far faster when the
        # cores are shared (OpenMP threads spin-wait on busy cores).
        torch.set_num_threads(1)
    run_demo(out=args.out, steps=args.steps, gen_steps=args.gen_steps, device=str(_device(args)),
             progress=not args.no_progress, teacher_image=args.teacher_image, teacher_video=args.teacher_video,
             perceptual_weights=args.perceptual_weights)
    return 0


def _train_config(args):
    if args.what == "tokenizer":
        from dera_fast.train.tokenizer import TokenizerTrainConfig as Cfg
    else:
        from dera_fast.train.generator import GeneratorTrainConfig as Cfg
    if (args.config is None) == (args.preset is None):
        raise CLIError("give exactly one of --config cfg.json or --preset NAME")
    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise CLIError(f"--set expects key=value, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    for key in ("steps", "batch_size", "data", "tokens"):
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    if args.config is not None:
        path = Path(args.config)
        if not path.is_file():
            raise CLIError(f"config file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CLIError(f"{path} is not valid JSON ({e})") from None
        return Cfg.from_dict({**data, **overrides})
    return Cfg.from_name(args.preset, **overrides)


def _cmd_train(args) -> int:
    cfg = _train_config(args)
    out = args.out or f"runs/{args.what}"
    from dera_fast.train.loop import run_training

    if args.what == "tokenizer":
        from dera_fast.train.tokenizer import TokenizerTrainer as Trainer
    else:
        from dera_fast.train.generator import GeneratorTrainer as Trainer
    if args.dtype in ("fp32", "float32"):
        cfg.amp = "off"
    result = run_training(Trainer, cfg, out, device=args.device, progress=not args.no_progress, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: round(v, 4) for k, v in result.items()}))
        print(f"model written to {Path(out) / 'model'}")
    return 0


def _cmd_tokenize(args) -> int:
    import torch

    from dera_fast.data import VideoFolderDataset
    from dera_fast.train.tokens import config_hash, save_tokens

    device = _device(args)
    model = load_tokenizer(args.model, device).to(_dtype(args, device))
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
        video = _read_clip_video(path, model, args.fps).to(_dtype(args, device))
        ids = model.encode_video(video, stride=stride, batch_size=args.batch_size, progress=not args.no_progress)
        all_ids.append(ids)
        all_labels += [label] * ids.shape[0]
        starts += [i * stride for i in range(ids.shape[0])]
    tokens = torch.cat(all_ids)
    meta = {"source": src.name, "fps": args.fps or "native", "clip_len": model.frames_per_clip, "stride": stride,
            "size": model.config.size, "tokenizer_config_hash": config_hash(model.config.to_dict()),
            "model_type": model.model_type, "device": device.type, "dtype": str(_dtype(args, device)),
            "backend": args.backend, "num_clips": tokens.shape[0]}
    if classes:
        meta.update(num_classes=len(classes), classes=json.dumps(classes))
    save_tokens(args.output, tokens, codebook_size=model.codebook_size, labels=torch.tensor(all_labels),
                starts=torch.tensor(starts), meta=meta)
    print(f"wrote {tokens.shape[0]} clips x {tokens.shape[1]} tokens to {args.output}")
    return 0


def _cmd_reconstruct(args) -> int:
    import torch

    from dera_fast import metrics, viz
    from dera_fast.data import write_video
    from dera_fast.train.tokens import load_tokens

    device = _device(args)
    dtype = _dtype(args, device)
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
        video = _read_clip_video(src, model, args.fps)
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


def _cmd_generate(args) -> int:
    import torch

    from dera_fast import viz
    from dera_fast.generate import generate
    from dera_fast.models.ar import ARGenerator

    device = _device(args)
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
        video = _read_clip_video(args.context, tok, None)[:, : args.context_frames]
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


def _cmd_bench(args) -> int:
    from dera_fast.demo import bench

    rows = bench(preset=args.preset, what=args.what.split(","), batch=args.batch, iters=args.iters,
                 device=str(_device(args)), dtype=_dtype(args, _device(args)), backend=args.backend)
    for r in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints the whole usage block)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"],
                   help="kernel backend for dera_fast ops")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; the demo uses 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dera_fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="command", parser_class=_Parser)
    p = sub.add_parser("info", help="versions, build info, backends and GPU")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("demo", help="train a tiny DeRA tokenizer and generator on synthetic clips (CPU, minutes)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, default=None, help="tokenizer steps (default: the demo's)")
    p.add_argument("--gen-steps", type=int, default=None, help="generator steps (default: the demo's)")
    p.add_argument("--teacher-image", default=None, help="local image-teacher weights (default: random teacher)")
    p.add_argument("--teacher-video", default=None, help="local video-teacher weights (default: random teacher)")
    p.add_argument("--perceptual-weights", default=None, help="local VGG16 .safetensors (default: no LPIPS)")
    _common(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("train", help="train a tokenizer or generator (torchrun-compatible)")
    p.add_argument("what", choices=["tokenizer", "generator"])
    p.add_argument("--config", default=None, help="JSON file of training-config fields")
    p.add_argument("--preset", default=None, help="named training preset (tokenizer: tiny, larp-l, dera-l; "
                                                  "generator: tiny, ucf-lp)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<what>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's newest checkpoint")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--data", default=None, help="tokenizer: synthetic, a video folder or a LARP CSV")
    p.add_argument("--tokens", default=None, help="generator: token file from `tokenize`")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config field (JSON value)")
    _common(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("tokenize", help="video file or folder -> token file (.safetensors)")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--model", required=True, help="tokenizer folder")
    p.add_argument("--stride", type=int, default=None, help="frames between clip starts (default: clip length)")
    p.add_argument("--fps", type=float, default=None, help="resample to this frame rate (default: native)")
    p.add_argument("--label", type=int, default=-1, help="class id stored for a single input file")
    p.add_argument("--batch-size", type=int, default=8)
    _common(p)
    p.set_defaults(func=_cmd_tokenize)

    p = sub.add_parser("reconstruct", help="video or token file -> reconstructed video")
    p.add_argument("input", help="video file or token file (.safetensors)")
    p.add_argument("output", help=".mp4, .gif or .png")
    p.add_argument("--model", required=True, help="tokenizer folder")
    p.add_argument("--side-by-side", action="store_true", help="input and reconstruction in one video")
    p.add_argument("--metrics", action="store_true", help="print PSNR and SSIM")
    p.add_argument("--fps", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    _common(p)
    p.set_defaults(func=_cmd_reconstruct)

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
    _common(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("bench", help="encode / decode / generate throughput of a preset (random weights)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--what", default="tokenizer,generator")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    _common(p)
    p.set_defaults(func=_cmd_bench)
    return parser


def _run(args) -> int:
    import torch

    from dera_fast import use_backend

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if getattr(args, "dtype", "auto") == "fp16":
        logging.getLogger("dera_fast").warning("fp16 can overflow in these models; bf16 is the safe low precision")
    backend = getattr(args, "backend", "auto")
    if backend == "auto":  # leave the choice to DERA_FAST_BACKEND / an enclosing use_backend()
        return args.func(args)
    with use_backend(backend):
        return args.func(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 talks
    logging.basicConfig(level=logging.INFO if main_rank else logging.ERROR, format="%(message)s")
    if os.environ.get("DERA_FAST_DEBUG") == "1":  # full tracebacks for bug reports
        return _run(args)
    from dera_fast.backends import BackendUnavailableError

    try:
        return _run(args)
    except CLIError as e:
        print(f"dera_fast {args.command}: error: {e}", file=sys.stderr)
        return e.code
    except (ImportError, BackendUnavailableError) as e:
        print(f"dera_fast {args.command}: missing optional dependency: {e}", file=sys.stderr)
        return 3
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError) as e:
        print(f"dera_fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dera_fast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
