"""``dera_fast eval tokenizer|generator|compare``: LARP's evaluation protocol (rFVD / PSNR / SSIM / LPIPS, gFVD,
FP FVD) on a video folder or CSV split, plain or under ``torchrun``; result files record their protocol, and
``compare`` refuses results computed under different protocols."""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from ._common import (CLIError, add_common_options, finite_float, int_at_least, load_tokenizer, non_negative_int,
                      positive_float, positive_int, probability, resolve_dtype, warn_ignored)


def _shared(p: argparse.ArgumentParser, default_seed: int, default_batch: int) -> None:
    p.add_argument("--data", required=True, help="LARP CSV split (id,path,action,label) or a folder of videos")
    p.add_argument("--root", default=None, help="base folder of relative CSV paths (default: the CSV's folder)")
    p.add_argument("--i3d", required=True, help="StyleGAN-V's I3D TorchScript (i3d_torchscript.pt; trusted file)")
    p.add_argument("--batch-size", type=positive_int, default=default_batch, help="clips per global batch")
    p.add_argument("--seed", type=non_negative_int, default=default_seed)
    p.add_argument("--workers", type=non_negative_int, default=2, help="data-loading processes per rank")
    p.add_argument("--out", default=None, help="result JSON (default: eval_<what>.json); the real-clip I3D "
                                               "statistics are cached next to it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--no-cache", action="store_true", help="neither reuse nor write cached real statistics")
    add_common_options(p)


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a tokenizer (rFVD, PSNR, SSIM, LPIPS) or a generator (gFVD, FP FVD) "
                                    "with LARP's protocol (torchrun-compatible)")
    ev = p.add_subparsers(dest="what", metavar="what")
    t = ev.add_parser("tokenizer", help="reconstruction metrics on a dataset")
    t.add_argument("--model", required=True, help="tokenizer folder (save_pretrained)")
    t.add_argument("--lpips-vgg", default=None, help="VGG16 backbone .safetensors (torchvision layout) for LPIPS")
    t.add_argument("--lpips-heads", default=None, help="LPIPS linear heads .safetensors (default: the installed "
                                                       "lpips package's, else uniform heads, reported apart)")
    t.add_argument("--num-videos", type=int_at_least(2), default=None,
                   help="a seeded subset of this many videos (default: all, LARP's protocol)")
    _shared(t, default_seed=0, default_batch=8)
    g = ev.add_parser("generator", help="gFVD (class-conditional) or FP FVD (frame prediction)")
    g.add_argument("--model", required=True, help="generator folder")
    g.add_argument("--tokenizer", required=True, help="tokenizer folder")
    g.add_argument("--num-samples", type=int_at_least(2), default=None,
                   help="generated clips (default: LARP's 10000 class-conditional, 50000 frame prediction)")
    g.add_argument("--cfg", type=finite_float, default=1.0, help="classifier-free guidance (LARP UCF: 1.25)")
    g.add_argument("--temperature", type=positive_float, default=1.0)
    g.add_argument("--top-k", type=non_negative_int, default=0)
    g.add_argument("--top-p", type=probability, default=1.0)
    g.add_argument("--context-frames", type=positive_int, default=None, help="frame prediction (default, LARP: 5)")
    g.add_argument("--fp-size", type=non_negative_int, default=None,
                   help="frame prediction: resize both sides before I3D (default, LARP: 64; 0 = no resize)")
    g.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="compile the decode step (auto: on CUDA)")
    _shared(g, default_seed=42, default_batch=32)
    c = ev.add_parser("compare", help="two result files side by side (refused when their protocols differ)")
    c.add_argument("results", nargs=2, help="a.json b.json")
    c.add_argument("--strict", action="store_true", help="also refuse when world size, batch size, version or "
                                                        "git sha differ")
    p.set_defaults(func=run)


def _check_out(args, inputs: list) -> Path:
    out = Path(args.out or f"eval_{args.what}.json")
    if out.is_dir():
        raise CLIError(f"--out {out} is a folder; expected a .json file")
    if out.suffix.lower() != ".json":
        raise CLIError(f"--out {out}: expected a .json file")
    resolved = out.resolve()
    for src in inputs:
        if src is not None and Path(src).resolve() == resolved:
            raise CLIError(f"--out {out} is an input file; refusing to overwrite it")
    if out.exists() and not args.overwrite:
        raise CLIError(f"--out {out} exists; pass --overwrite to replace it")
    return out


def _check_files(**paths) -> None:
    for flag, path in paths.items():
        if path is not None and not Path(path).is_file():
            raise CLIError(f"--{flag.replace('_', '-')} {path}: file not found")


@contextlib.contextmanager
def _process_group(args):
    """The run's DistInfo; the process group is destroyed at the end only when this command created it (a caller's
    group, several commands in one process, stays up)."""
    import torch.distributed as dist

    from dera_fast.train.distributed import cleanup, init_distributed

    owned = not dist.is_initialized()
    try:
        info = init_distributed(args.device)
    except ValueError as e:
        raise CLIError(str(e)) from None
    try:
        yield info
    finally:
        if owned:
            cleanup()


def _run_options(args, info, out: Path) -> dict:
    """The keyword arguments both evaluations take from the shared options."""
    return dict(batch_size=args.batch_size, seed=args.seed, workers=args.workers,
                cache_dir=None if args.no_cache else out.parent, progress=False if args.no_progress else None,
                info=info)


def _write(out: Path, result: dict) -> None:
    from dera_fast.eval.protocol import write_json_atomic

    write_json_atomic(out, result)
    rs = result["real_stats"]
    if rs["path"]:
        print(f"real-clip statistics {'reused from' if rs['reused'] else 'cached to'} {rs['path']}")
    print(f"wrote {out}")


def _run_tokenizer(args) -> int:
    from dera_fast.eval import evaluate_tokenizer

    _check_files(i3d=args.i3d, lpips_vgg=args.lpips_vgg, lpips_heads=args.lpips_heads)
    if not Path(args.data).exists():
        raise CLIError(f"--data {args.data}: not found")
    out = _check_out(args, [args.data, args.i3d, args.lpips_vgg, args.lpips_heads,
                            Path(args.model) / "model.safetensors", Path(args.model) / "config.json"])
    with _process_group(args) as info:
        model = load_tokenizer(args.model, info.device).to(resolve_dtype(args, info.device))
        res = evaluate_tokenizer(model, args.data, i3d=args.i3d, root=args.root, lpips_vgg=args.lpips_vgg,
                                 lpips_heads=args.lpips_heads, num_videos=args.num_videos, model_path=args.model,
                                 **_run_options(args, info, out))
        if info.is_main:
            m, t = res["metrics"], res["throughput"]
            lp = next((f"  {k.upper()} {m[k]:.4f}" for k in ("lpips", "lpips_uniform_heads") if k in m), "")
            psnr = "inf" if m["psnr"] == float("inf") else f"{m['psnr']:.2f}"
            print(f"rFVD {m['rfvd']:.2f}  PSNR {psnr} dB  SSIM {m['ssim']:.4f}{lp}  codebook usage "
                  f"{100 * m['codebook_usage']:.1f}% (perplexity {m['codebook_perplexity']:.0f})  "
                  f"[{m['num_videos']} videos, {t['clips_per_s']:.2f} clips/s, world size {info.world_size}]")
            _write(out, res)
    return 0


def _run_generator(args) -> int:
    from dera_fast.eval import evaluate_generator
    from dera_fast.models.ar import ARGenerator

    _check_files(i3d=args.i3d)
    if not Path(args.data).exists():
        raise CLIError(f"--data {args.data}: not found")
    if not (Path(args.model) / "model.safetensors").is_file():
        raise CLIError(f"--model {args.model}: no model.safetensors there (expected a generator folder)")
    out = _check_out(args, [args.data, args.i3d, Path(args.model) / "model.safetensors",
                            Path(args.tokenizer) / "model.safetensors"])
    with _process_group(args) as info:
        dtype = resolve_dtype(args, info.device)
        gen = ARGenerator.from_pretrained(args.model, device=info.device).to(dtype)
        tok = load_tokenizer(args.tokenizer, info.device).to(dtype)
        compile_ = args.compile == "on" or (args.compile == "auto" and info.device.type == "cuda")
        if not gen.config.frame_prediction:
            warn_ignored([f for f, v in (("--context-frames", args.context_frames), ("--fp-size", args.fp_size))
                          if v is not None], "the generator is class-conditional (they set up frame prediction)")
        context_frames = 5 if args.context_frames is None else args.context_frames
        fp_size = 64 if args.fp_size is None else args.fp_size or None
        res = evaluate_generator(gen, tok, args.data, i3d=args.i3d, root=args.root, num_samples=args.num_samples,
                                 cfg_scale=args.cfg, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, context_frames=context_frames, fp_size=fp_size,
                                 compile=compile_, model_paths={"generator": args.model, "tokenizer": args.tokenizer},
                                 **_run_options(args, info, out))
        if info.is_main:
            m, t = res["metrics"], res["throughput"]
            name = "FP FVD" if "fp_fvd" in m else "gFVD"
            print(f"{name} {m.get('fp_fvd', m.get('gfvd')):.2f}  [{m['num_samples']} samples, cfg {args.cfg}, "
                  f"{t['samples_per_s']:.2f} samples/s, world size {info.world_size}]")
            _write(out, res)
    return 0


def _run_compare(args) -> int:
    from dera_fast.eval.protocol import compare_results, load_result

    a, b = (load_result(p) for p in args.results)
    print(compare_results(a, b, names=tuple(args.results), strict=args.strict))
    return 0


def run(args) -> int:
    if args.what is None:
        raise CLIError("say what to evaluate: eval tokenizer | eval generator | eval compare (see --help)")
    return {"tokenizer": _run_tokenizer, "generator": _run_generator, "compare": _run_compare}[args.what](args)
