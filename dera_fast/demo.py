"""``python -m dera_fast demo``: the whole pipeline on a CPU in a few minutes, with pictures and numbers.

1. build :class:`~dera_fast.data.SyntheticClips` (real photographs under known camera motion, no download);
2. train the ``tiny`` DeRA tokenizer (alignment against seeded random teachers unless weights are given);
3. write ``reconstruction.{mp4,gif,png}`` (rows: input / reconstruction / |error| x 4);
4. tokenize the clips to ``tokens.safetensors``;
5. train a tiny class-conditional AR generator on them and write ``samples.{mp4,gif,png}`` (one row per class);
6. print a summary: PSNR / SSIM before and after training against an untrained model and a mean-frame baseline,
   codebook usage, tokens/s and wall time.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

log = logging.getLogger("dera_fast.demo")

DEMO_STEPS = 1000         # tokenizer steps (batch 8)
DEMO_GEN_STEPS = 300      # generator steps (batch 32)
NUM_TRAIN_CLIPS = 160     # 20 classes x 8
NUM_EVAL_CLIPS = 40       # held out: other seeds of the same classes


@torch.no_grad()
def evaluate(model, clips: torch.Tensor, batch: int = 20) -> dict:
    """PSNR / SSIM (on [0, 1] pixels) and codebook statistics of ``model`` on ``clips`` [N, 3, T, H, W]."""
    from dera_fast import metrics

    lo, hi = model.config.pixel_range
    was = model.training
    model.eval()
    device = model.decoder_query_pe.device
    ids = torch.cat([model.encode(clips[i:i + batch].to(device)).cpu() for i in range(0, len(clips), batch)])
    recon = torch.cat([model.decode(ids[i:i + batch].to(device)).float().cpu() for i in range(0, len(ids), batch)])
    model.train(was)
    stats = metrics.codebook_stats(ids, model.codebook_size)
    return {**_quality(clips, recon.clamp(lo, hi), (lo, hi)), "usage": stats["usage"],
            "perplexity": stats["perplexity"], "ids": ids, "recon": recon}


def _quality(x: torch.Tensor, y: torch.Tensor, pixel_range) -> dict:
    from dera_fast import metrics

    return {"psnr": float(metrics.psnr(x, y, value_range=pixel_range)),
            "ssim": float(metrics.ssim(x, y, value_range=pixel_range))}


def mean_frame_baseline(train: torch.Tensor, clips: torch.Tensor, pixel_range) -> dict:
    """Every frame of every clip predicted as the training set's mean frame (what an input-blind model can do)."""
    mean = train.mean(dim=(0, 2), keepdim=True)                    # [1, 3, 1, H, W]
    return _quality(clips, mean.expand_as(clips), pixel_range)


def _stack(ds) -> tuple[torch.Tensor, torch.Tensor]:
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([it["video"] for it in items]), torch.tensor([it["label"] for it in items])


def _write_all(stem: Path, grid: torch.Tensor, fps: float, value_range) -> list[str]:
    """Write one grid clip as .mp4 (when PyAV is installed), .gif and .png."""
    from dera_fast.data import MissingDependencyError, write_video

    written = []
    for suffix in (".mp4", ".gif", ".png"):
        try:
            written.append(str(write_video(stem.with_suffix(suffix), grid, fps, value_range=value_range)))
        except MissingDependencyError as e:
            log.warning("skipped %s: %s", stem.with_suffix(suffix).name, e)
    return written


def run_demo(out: str | Path = "runs/demo", *, steps: int | None = None, gen_steps: int | None = None,
             device: str = "cpu", progress: bool | None = None, teacher_image: str | None = None,
             teacher_video: str | None = None, perceptual_weights: str | None = None,
             num_train_clips: int = NUM_TRAIN_CLIPS, num_eval_clips: int = NUM_EVAL_CLIPS) -> dict:
    """Run the demo; returns the summary dict (also written to ``<out>/summary.json``)."""
    from dera_fast import viz
    from dera_fast.data import SyntheticClips
    from dera_fast.generate import generate
    from dera_fast.train.generator import GeneratorTrainConfig, GeneratorTrainer
    from dera_fast.train.tokenizer import TokenizerTrainConfig, TokenizerTrainer
    from dera_fast._files import write_text
    from dera_fast.train.loop import prepare_run_folder
    from dera_fast.train.tokens import save_tokens, tokenizer_provenance

    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for run in ("tokenizer", "generator"):  # the demo's own run folders start afresh
        prepare_run_folder(out / run, overwrite=True)
    steps = DEMO_STEPS if steps is None else steps
    gen_steps = DEMO_GEN_STEPS if gen_steps is None else gen_steps
    tcfg = TokenizerTrainConfig.from_name("tiny", steps=steps, gan_start=4 * steps // 5, teacher_image=teacher_image,
                                          teacher_video=teacher_video, perceptual_weights=perceptual_weights,
                                          log_every=max(1, min(10, steps // 10)))

    # 1. data
    from dera_fast.models import TokenizerConfig

    mcfg = TokenizerConfig.from_name(tcfg.model)
    train_ds = SyntheticClips(num_train_clips, frames=mcfg.num_frames, size=mcfg.size,
                              value_range=mcfg.pixel_range, seed=0)
    eval_ds = SyntheticClips(num_eval_clips, frames=mcfg.num_frames, size=mcfg.size,
                             value_range=mcfg.pixel_range, seed=1)
    eval_x, _ = _stack(eval_ds)
    print(f"[1/6] SyntheticClips: {len(train_ds)} training + {len(eval_ds)} held-out clips of "
          f"{mcfg.num_frames}x{mcfg.size}x{mcfg.size}, {train_ds.num_classes} classes (motion x photo)")

    # 2. tokenizer
    trainer = TokenizerTrainer(tcfg, out / "tokenizer", device=device, progress=progress, dataset=train_ds)
    teachers = "the given teacher weights" if (teacher_image or teacher_video) else \
        "seeded RANDOM teachers (pass --teacher-image/--teacher-video: local DINOv3 / VideoMAE safetensors)"
    print(f"[2/6] training the tiny DeRA tokenizer ({sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f}M "
          f"params) for {steps} steps; alignment against {teachers}")
    before = evaluate(trainer.model, eval_x)
    train_x, train_y = _stack(train_ds)
    baseline = mean_frame_baseline(train_x, eval_x, mcfg.pixel_range)
    tok_result = trainer.train()
    model = trainer.model.eval()
    after = evaluate(model, eval_x)

    # 3. reconstruction pictures
    grid = viz.reconstruction_grid(eval_x[:8], after["recon"][:8].clamp(*mcfg.pixel_range),
                                   value_range=mcfg.pixel_range)
    recon_files = _write_all(out / "reconstruction", grid, 8.0, mcfg.pixel_range)
    print(f"[3/6] wrote {', '.join(recon_files)}")

    # 4. tokenize the training clips
    model.encode(train_x[:32].to(trainer.device))  # warm-up: time the steady state only
    t0 = time.perf_counter()
    ids = torch.cat([model.encode(train_x[i:i + 32].to(trainer.device)).cpu() for i in range(0, len(train_x), 32)])
    encode_tps = ids.numel() / (time.perf_counter() - t0)
    token_file = save_tokens(out / "tokens.safetensors", ids, codebook_size=model.codebook_size, labels=train_y,
                             meta={"source": "SyntheticClips(seed=0)", "fps": 8, "clip_len": mcfg.num_frames,
                                   "stride": mcfg.num_frames, "size": mcfg.size, "num_classes": train_ds.num_classes,
                                   "classes": json.dumps(train_ds.classes), **tokenizer_provenance(model)})
    print(f"[4/6] tokenized {ids.shape[0]} clips -> {token_file} ({ids.shape[1]} tokens each, "
          f"{encode_tps:,.0f} tokens/s)")

    # 5. generator
    gcfg = GeneratorTrainConfig.from_name("tiny", tokens=str(token_file), steps=gen_steps,
                                          log_every=max(1, min(10, gen_steps // 10)))
    print(f"[5/6] training a tiny class-conditional AR generator for {gen_steps} steps")
    gtrainer = GeneratorTrainer(gcfg, out / "generator", device=device, progress=progress)
    gen_result = gtrainer.train()
    classes = list(range(0, train_ds.num_classes, max(1, train_ds.num_classes // 5)))[:5]
    labels = torch.tensor(classes).repeat_interleave(4)
    res = generate(gtrainer.model.eval(), class_labels=labels.to(trainer.device), seed=0, tokenizer=model,
                   return_video=True, progress=False)
    samples = res.video.float().cpu().clamp(*mcfg.pixel_range)
    sample_files = _write_all(out / "samples", viz.samples_grid(samples, labels, value_range=mcfg.pixel_range),
                              8.0, mcfg.pixel_range)
    print(f"[6/6] wrote {', '.join(sample_files)} (rows: classes "
          f"{', '.join(train_ds.classes[c] for c in classes)})")

    wall = time.perf_counter() - t_start
    summary = {
        "psnr_untrained": before["psnr"], "psnr_mean_frame": baseline["psnr"], "psnr_trained": after["psnr"],
        "ssim_untrained": before["ssim"], "ssim_mean_frame": baseline["ssim"], "ssim_trained": after["ssim"],
        "codebook_usage_untrained": before["usage"], "codebook_usage_trained": after["usage"],
        "codebook_perplexity_trained": after["perplexity"],
        "tokenizer_train_clips_per_s": tok_result.get("clips_per_s", float("nan")),
        "tokenizer_train_seconds": tok_result.get("train_seconds", float("nan")),
        "encode_tokens_per_s": encode_tps, "generator_loss": gen_result.get("loss", float("nan")),
        "generator_train_tokens_per_s": gen_result.get("tokens_per_s", float("nan")),
        "generate_tokens_per_s": res.stats.get("tokens_per_s", float("nan")),
        "wall_seconds": wall, "device": str(trainer.device), "threads": torch.get_num_threads(),
        "tokenizer_steps": steps, "generator_steps": gen_steps, "teachers": "given" if teacher_image or
        teacher_video else "random", "perceptual": bool(perceptual_weights),
    }
    write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print_summary(summary, out)
    return summary


def print_summary(s: dict, out: Path) -> None:
    rows = [
        ("reconstruction PSNR (dB, held-out)", f"{s['psnr_untrained']:.2f} untrained | {s['psnr_mean_frame']:.2f} "
                                              f"mean frame | {s['psnr_trained']:.2f} trained"),
        ("reconstruction SSIM", f"{s['ssim_untrained']:.3f} untrained | {s['ssim_mean_frame']:.3f} mean frame | "
                                f"{s['ssim_trained']:.3f} trained"),
        ("codebook usage (held-out)", f"{100 * s['codebook_usage_untrained']:.0f}% -> "
                                      f"{100 * s['codebook_usage_trained']:.0f}% "
                                      f"(perplexity {s['codebook_perplexity_trained']:.1f})"),
        ("tokenizer training", f"{s['tokenizer_steps']} steps, {s['tokenizer_train_clips_per_s']:.1f} clips/s"),
        ("encode", f"{s['encode_tokens_per_s']:,.0f} tokens/s"),
        ("generator", f"{s['generator_steps']} steps, loss {s['generator_loss']:.3f}, sampling "
                      f"{s['generate_tokens_per_s']:,.0f} tokens/s"),
        ("wall time", f"{s['wall_seconds']:.0f} s on {s['device']} ({s['threads']} threads)"),
        ("outputs", str(out)),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n" + "=" * (width + 60))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("=" * (width + 60))


def bench(*, preset: str = "tiny", what=("tokenizer", "generator"), batch: int = 8, iters: int = 5,
          device: str = "cpu", dtype=torch.float32, backend: str = "auto") -> list[dict]:
    """Time encode / decode of a randomly initialised DeRA tokenizer and AR sampling (``python -m dera_fast bench``).

    Returns rows ``{"what", "preset", "backend", "ms", "clips_per_s", "tokens_per_s"}`` (``backend`` is the label of
    the caller's ``use_backend`` choice).
    """
    from dera_fast.models import DeRATokenizer, TokenizerConfig

    dev = torch.device(device)
    rows = []
    unknown = set(what) - {"tokenizer", "generator"}
    if unknown:
        raise ValueError(f"--what: unknown parts {sorted(unknown)}; choose from tokenizer, generator")
    cfg = TokenizerConfig.from_name(preset)
    tok = DeRATokenizer(cfg).to(dev, dtype).eval()
    x = torch.rand(batch, 3, cfg.num_frames, cfg.size, cfg.size, device=dev, dtype=dtype) * 2 - 1

    def timed(fn):
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / iters

    if "tokenizer" in what:
        ids = tok.encode(x)
        for name, fn in (("encode", lambda: tok.encode(x)), ("decode", lambda: tok.decode(ids))):
            s = timed(fn)
            rows.append({"what": name, "preset": preset, "backend": backend, "ms": 1e3 * s,
                         "clips_per_s": batch / s, "tokens_per_s": batch * cfg.num_tokens / s})
    if "generator" in what:
        from dera_fast.generate import generate
        from dera_fast.models.ar import ARGenerator, GeneratorConfig

        gcfg = GeneratorConfig.from_name("tiny" if preset == "tiny" else "B", vocab_size=cfg.codebook_size,
                                         max_seq_len=cfg.num_tokens)
        gen = ARGenerator(gcfg).to(dev).eval()
        labels = torch.arange(batch, device=dev) % gcfg.num_classes
        s = timed(lambda: generate(gen, class_labels=labels, seed=0, progress=False))
        rows.append({"what": "generate", "preset": preset, "backend": backend, "ms": 1e3 * s,
                     "clips_per_s": batch / s, "tokens_per_s": batch * cfg.num_tokens / s})
    return rows
