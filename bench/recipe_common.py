"""What the recipe scripts share: held-out real clips, the thumbnail baselines, and one training run measured
against steps and wall time (held-out PSNR, codes in use, output spread, latent spread).

Used by ``bench/recipe_sweep.py`` (small-scale recipe curves) and ``bench/recipe_dera_l.py`` (codes at dera-l scale).
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dera_fast import metrics
from dera_fast.demo import thumbnail


def heldout_clips(frames: int, size: int, num_clips: int = 48, value_range=(-1.0, 1.0), **data_kw) -> torch.Tensor:
    """[N, 3, frames, size, size]: the fixed held-out clips (last 30% of each sample video's frames)."""
    from dera_fast.data import SampleVideoClips

    ds = SampleVideoClips("heldout", frames, size, num_clips=num_clips, value_range=value_range, **data_kw)
    return torch.stack([ds[i]["video"] for i in range(len(ds))])


def psnr(x: torch.Tensor, y: torch.Tensor, value_range=(-1.0, 1.0)) -> float:
    return float(metrics.psnr(x, y.clamp(*value_range), value_range=value_range))


def spread_ratio(latents: torch.Tensor) -> float:
    """Latents [N, L, C]: std across clips (per token position and channel) over std overall (per channel, over
    clips and positions). Near 0: the latents encode the token position, not the clip; near 1: the content."""
    across = latents.float().std(0).mean()
    overall = latents.float().reshape(-1, latents.shape[-1]).std(0).mean()
    return float(across / overall.clamp_min(1e-12))


@torch.no_grad()
def evaluate(model, x: torch.Tensor, batch: int = 16) -> dict:
    """Deterministic (eval-mode) reconstruction of the held-out clips x: PSNR, codes in use, output spread, latent
    spread (unit code-space latents, what the codebook sees)."""
    was = model.training
    model.eval()
    lo, hi = model.config.pixel_range
    recon, ids, unit = [], [], []
    for i in range(0, len(x), batch):
        r, out = model(x[i:i + batch])
        recon.append(r.float().clamp(lo, hi))
        ids.append(out["ids"])
        unit.append(F.normalize(model.quantizer.in_linear(out["latents"]).float(), dim=-1))
    model.train(was)
    recon, ids, unit = torch.cat(recon), torch.cat(ids), torch.cat(unit)
    return {"psnr": psnr(x, recon, (lo, hi)), "codes": int(ids.unique().numel()), "K": model.codebook_size,
            "std_ratio": float(recon.std(0).mean() / x.std(0).mean()), "spread_ratio": spread_ratio(unit)}


class _Mixed(torch.utils.data.Dataset):
    """Two datasets back to back (the epoch is passed on to those that draw per-epoch augmentation)."""

    def __init__(self, *parts):
        self.parts = parts

    def __len__(self):
        return sum(len(p) for p in self.parts)

    def set_epoch(self, epoch):
        for p in self.parts:
            if hasattr(p, "set_epoch"):
                p.set_epoch(epoch)

    def __getitem__(self, i):
        for p in self.parts:
            if i < len(p):
                return p[i]
            i -= len(p)
        raise IndexError(i)


def _eval_model(trainer):
    """The weights a run would export: the EMA copy when the run keeps one, else the live model."""
    if trainer.ema is None:
        return trainer.model
    model = copy.deepcopy(trainer.model)
    trainer.ema.copy_to(model)
    return model


def train_and_measure(name: str, *, preset: str = "tiny", train: dict | None = None, model: dict | None = None,
                      steps: int = 400, eval_steps=(0, 20, 50, 100, 200, 300, 400), time_limit: float = 0.0,
                      eval_every_s: float = 30.0, num_heldout: int = 48, out_dir: str | Path = "/tmp/recipe_runs",
                      aux: bool = False, data_kw: dict | None = None) -> dict:
    """Train ``preset`` (TokenizerTrainConfig) from scratch on the real clips' training split, evaluating on the
    held-out clips at ``eval_steps`` (and every ``eval_every_s`` seconds of training when ``time_limit`` is set: the
    run then stops after that many seconds). Evaluation time is excluded from the wall time (data loading is not).
    ``aux=False`` switches off the GAN, the AR prior and the alignment; True keeps the preset's.
    Returns ``{"name", "config", "curve": [{"step", "wall", "psnr", "codes", ...}], ...}``."""
    from dera_fast.data import SampleVideoClips
    from dera_fast.models import TokenizerConfig
    from dera_fast.train.tokenizer import TokenizerTrainConfig, TokenizerTrainer

    base = dict(steps=steps, log_every=10 ** 9, ckpt_every=0, ckpt_minutes=0, num_workers=0,
                model_overrides=model or {})
    if not aux:
        base.update(gan_weight=0.0, prior_weight=0.0, align=False)
    cfg = TokenizerTrainConfig.from_name(preset, **{**base, **(train or {})})
    mcfg = TokenizerConfig.from_name(cfg.model, **cfg.model_overrides)
    data_kw = {"scale": tuple(cfg.crop_scale), **(data_kw or {})}  # the preset's crops unless told otherwise
    synthetic = data_kw.pop("synthetic", 0)
    heldout_only = data_kw.pop("heldout", {})
    heldout_kw = {**data_kw, **heldout_only}  # held-out options that differ from training's
    data = SampleVideoClips("train", mcfg.num_frames, mcfg.size, num_clips=4096, value_range=mcfg.pixel_range,
                            seed=cfg.seed, **data_kw)
    if synthetic:
        from dera_fast.data import SyntheticClips

        data = _Mixed(data, SyntheticClips(synthetic, frames=mcfg.num_frames, size=mcfg.size,
                                           value_range=mcfg.pixel_range, seed=cfg.seed))
    x = heldout_clips(mcfg.num_frames, mcfg.size, num_heldout, mcfg.pixel_range, **heldout_kw)
    trainer = TokenizerTrainer(cfg, Path(out_dir) / name, progress=False, dataset=data)
    rec = {"name": name, "preset": preset, "train": train or {}, "model": model or {}, "data": data_kw,
           "config": cfg.to_dict(),
           "params": trainer.model.num_parameters(), "bits_per_clip": mcfg.num_tokens * math.log2(mcfg.codebook_size),
           "psnr_thumbnail_4x4": psnr(x, thumbnail(x, 4)), "psnr_thumbnail_8x8": psnr(x, thumbnail(x, 8)),
           "curve": [], "threads": torch.get_num_threads()}
    wall, next_eval, train_psnr = 0.0, eval_every_s, []
    evals = set(eval_steps) | {steps}
    while True:
        timed_out = time_limit and wall >= time_limit
        if trainer.step in evals or timed_out or (time_limit and wall >= next_eval):
            e = {"step": trainer.step, "wall": round(wall, 2), **evaluate(_eval_model(trainer), x)}
            if trainer.step:
                e.update(train_psnr=sum(train_psnr[-25:]) / len(train_psnr[-25:]),
                         **{k: v for k, v in trainer.model.quantizer.usage_stats().items()})
            rec["curve"].append(e)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in e.items()}), flush=True)
            next_eval = wall + eval_every_s
        if trainer.step >= steps or timed_out:
            break
        t0 = time.perf_counter()  # data loading counts: a live demo pays it too
        logs = trainer.train_step(next(trainer.stream))
        wall += time.perf_counter() - t0
        train_psnr.append(logs["psnr"])
    rec["train_seconds"] = wall
    rec["sec_per_step"] = wall / max(trainer.step, 1)
    rec["psnr_untrained"] = rec["curve"][0]["psnr"]
    return rec
