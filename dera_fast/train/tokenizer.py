"""Tokenizer trainer (LARP / DeRA): SPEC.md §2.6-2.7 and §3.6-3.8.

Per step (G every step, D every ``d_update_every`` steps, on detached reconstructions):

    L_G = l1 * |x - x̂| + perc * LPIPS(x, x̂) + gan * (-log σ(D(x̂))) + vq * L_q + prior * L_prior
          + w_a * λ_a * L_align_a + w_m * λ_m * L_align_m        (DeRA; w from SACP, 1 without it)
    L_D = BCE_smooth(D(x), D(sg(x̂))) + lecam * LeCam

Losses are computed on [0, 1] pixels (LARP's range) whatever the model's ``pixel_range``. Launch plainly or with
``torchrun``: the tokenizer and the discriminator are each wrapped in DDP; only rank 0 logs, draws bars and
writes files.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from dera_fast.models.teachers import compute_targets

from .._config import PresetConfig
from . import checkpoint as ckpt
from .distributed import DistInfo, init_distributed
from .loop import BatchStream, MetricsLog, autocast, run_steps
from .losses import LeCam, TransformerDiscriminator, build_perceptual, d_loss_ns_smooth, g_loss_ns, l1_loss
from .optim import EMA, make_adam, param_groups, schedule_mult, set_lr

log = logging.getLogger("dera_fast.train")


@dataclass(kw_only=True)
class TokenizerTrainConfig(PresetConfig):
    """Everything a tokenizer run needs; JSON-serialisable (``--config cfg.json`` holds these fields)."""
    _kind = "tokenizer training"

    model: str = "tiny"                   # TokenizerConfig preset
    model_overrides: dict = field(default_factory=dict)
    arch: str = "dera"                    # "dera" | "larp"
    data: str = "synthetic"               # "synthetic", a folder of videos, or a LARP-format CSV
    num_clips: int = 0                    # synthetic only; 0 = the dataset's default
    batch_size: int = 8                   # global batch (per rank = batch_size / world size)
    steps: int = 1000
    lr: float = 1e-4
    d_lr: float = 3e-5
    betas: tuple[float, float] = (0.5, 0.9)
    warmup_steps: int = 0
    min_lr_mult: float = 0.01
    prior_lr_mult: float = 1.0            # LARP paper: 50 (its released trainer loses it after step 0)
    grad_clip: float = 0.0                # 0 = off (LARP default)
    l1_weight: float = 1.0
    perceptual_weight: float = 1.0        # active only when perceptual_weights is set
    perceptual_net: str = "vgg"           # "vgg" | "alex"
    perceptual_weights: str | None = None  # local torchvision-layout .safetensors backbone
    perceptual_heads: str | None = None   # optional lpips linear heads (.safetensors)
    gan_weight: float = 0.3
    gan_start: int = 0                    # first step with the GAN terms
    d_update_every: int = 5
    disc_dim: int = 512
    disc_depth: int = 12
    disc_heads: int = 8
    lecam_weight: float = 0.001           # applied once (LARP applies its 0.001 twice: effective 1e-6)
    lecam_decay: float = 0.999
    vq_weight: float = 0.1
    prior_weight: float = 0.06            # 0 switches the AR-prior loss off
    align: bool = True                    # DeRA alignment losses (weights from the model config)
    sacp: str = "loss_reweight"           # "loss_reweight" | "project" | "off"
    teacher_image: str | None = None      # local image-teacher weights (.safetensors); None = seeded random teacher
    teacher_image_arch: str = "dinov3-b16"  # preset of models.teachers.IMAGE_PRESETS for teacher_image
    teacher_video: str | None = None      # local video-teacher weights; None = seeded random teacher
    teacher_video_arch: str = "videomae-b"  # preset of models.teachers.VIDEO_PRESETS for teacher_video
    ema_decay: float = 0.0                # 0 = no EMA weights
    amp: str = "auto"                     # bf16 autocast on CUDA unless "off"
    seed: int = 0
    num_workers: int = 0
    log_every: int = 10
    vis_every: int = 0                    # reconstruction grid every N steps (0 = only at the end)
    ckpt_every: int = 0                   # 0 = only at the end
    keep_last: int = 3

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.arch not in ("dera", "larp"):
            raise ValueError(f"arch must be 'dera' or 'larp', got {self.arch!r}")
        if self.sacp not in ("loss_reweight", "project", "off"):
            raise ValueError(f"sacp must be loss_reweight, project or off, got {self.sacp!r}")
        for name in ("batch_size", "steps", "d_update_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")



PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized: the tiny model and a small discriminator. The GAN starts late and light: at this size it mostly
    # fights the L1 term (measured: weight 0.05 from mid-run cost ~2 dB PSNR).
    "tiny": dict(model="tiny", batch_size=8, steps=600, lr=2e-3, d_lr=2e-4, warmup_steps=20, disc_dim=32,
                 disc_depth=2, disc_heads=2, gan_weight=0.01, gan_start=480, log_every=10),
    # LARP-L (SPEC §2.7): global batch 128; set steps to epochs * clips / 128.
    "larp-l": dict(model="larp-l", arch="larp", batch_size=128, steps=150_000, warmup_steps=8_000, align=False,
                   sacp="off"),
    # DeRA (SPEC §3.8): LARP's recipe plus alignment with SACP.
    "dera-l": dict(model="dera-l", arch="dera", batch_size=128, steps=75_000, warmup_steps=8_000),
}


def build_teachers(mcfg, cfg: TokenizerTrainConfig) -> tuple:
    """(image teacher, video teacher): loaded from local weights when given, else seeded random stand-ins."""
    from dera_fast.models import teachers as T

    def random(kind, dim, seed):
        return T.RandomTeacher(kind, seed=seed, dim=dim, frames=mcfg.num_frames, size=mcfg.size, patch=mcfg.patch,
                               tubelet=mcfg.patch_t, pixel_range=mcfg.pixel_range)

    image = (T.ImageViTTeacher.from_pretrained(cfg.teacher_image, cfg.teacher_image_arch,
                                               pixel_range=mcfg.pixel_range) if cfg.teacher_image
             else random("image", mcfg.align_dim_appearance, cfg.seed + 101))
    video = (T.VideoViTTeacher.from_pretrained(cfg.teacher_video, cfg.teacher_video_arch,
                                               pixel_range=mcfg.pixel_range) if cfg.teacher_video
             else random("video", mcfg.align_dim_motion, cfg.seed + 202))
    log.info("DeRA alignment teachers: image %s, video %s",
             cfg.teacher_image or "seeded RANDOM stand-in", cfg.teacher_video or "seeded RANDOM stand-in")
    return image, video


def _to01(x: torch.Tensor, pixel_range: tuple[float, float]) -> torch.Tensor:
    lo, hi = pixel_range
    return (x - lo) / (hi - lo)


def batch_psnr(x01: torch.Tensor, y01: torch.Tensor) -> float:
    """Mean per-clip PSNR (dB) of [0, 1] videos (reconstructions clamped to [0, 1])."""
    mse = (x01.float() - y01.float().clamp(0, 1)).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((-10 * torch.log10(mse)).mean())


class TokenizerTrainer:
    """Builds model, discriminator, optimisers and data from a :class:`TokenizerTrainConfig` and trains.

    Args:
        cfg: the run's config.
        out_dir: run folder (checkpoints/, metrics.jsonl, samples/, model/).
        device: "auto" | "cpu" | "cuda".
        progress: draw a tqdm bar (rank 0 only).
        dataset: optional dataset override (items ``{"video", "label", ...}`` in the model's pixel range).
    """

    def __init__(self, cfg: TokenizerTrainConfig, out_dir: str | Path, *, device: str = "auto",
                 progress: bool = True, dataset=None):
        from dera_fast.models import TokenizerConfig

        self.cfg, self.out = cfg, Path(out_dir)
        self.info: DistInfo = init_distributed(device)
        self.device = self.info.device
        if cfg.batch_size % self.info.world_size:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by world size {self.info.world_size}")
        torch.manual_seed(cfg.seed + self.info.rank)
        mcfg = TokenizerConfig.from_name(cfg.model, **cfg.model_overrides)
        if cfg.prior_weight <= 0:  # no prior at all: an unused prior would also stall DDP's gradient reduction
            mcfg = mcfg.replace(prior_depth=0)
        self.model = self._build_model(mcfg).to(self.device).train()
        self.pixel_range = mcfg.pixel_range
        self.perceptual = build_perceptual(cfg.perceptual_weights, cfg.perceptual_net, cfg.perceptual_heads) \
            if cfg.perceptual_weight > 0 else None
        if self.perceptual is not None:
            self.perceptual.to(self.device)
        self.use_gan = cfg.gan_weight > 0
        self.disc = TransformerDiscriminator(frames=mcfg.num_frames, size=mcfg.size, patch_t=mcfg.patch_t,
                                             patch=mcfg.patch, dim=cfg.disc_dim, depth=cfg.disc_depth,
                                             heads=cfg.disc_heads).to(self.device) if self.use_gan else None
        self.lecam = LeCam(cfg.lecam_decay).to(self.device)
        self.opt = make_adam(param_groups([
            ("prior", self.model.prior.parameters() if self.model.prior is not None else [], cfg.prior_lr_mult),
            ("tokenizer", [p for n, p in self.model.named_parameters() if not n.startswith("prior.")], 1.0),
        ]), cfg.lr, cfg.betas)
        self.d_opt = make_adam(param_groups([("disc", self.disc.parameters(), 1.0)]), cfg.d_lr, cfg.betas) \
            if self.use_gan else None
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.sacp = self._build_sacp()
        self.model_ddp, self.disc_ddp = self.model, self.disc
        if self.info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model_ddp = DDP(self.model, device_ids=ids, find_unused_parameters=True)
            if self.use_gan:
                self.disc_ddp = DDP(self.disc, device_ids=ids)
        self.dataset = dataset if dataset is not None else self._build_dataset(mcfg)
        self.stream = BatchStream(self.dataset, cfg.batch_size // self.info.world_size, self.info, seed=cfg.seed,
                                  num_workers=cfg.num_workers)
        self.step = 0
        self.progress = progress and self.info.is_main
        self.metrics = MetricsLog(self.out / "metrics.jsonl", enabled=self.info.is_main)

    # ------------------------------------------------------------------ construction
    def _build_model(self, mcfg):
        from dera_fast import models

        self.teachers = None
        if self.cfg.arch == "larp":
            return models.LARPTokenizer(mcfg)
        if self.cfg.align:
            self.teachers = build_teachers(mcfg, self.cfg)
            # the alignment heads project to the teachers' feature widths
            mcfg = mcfg.replace(align_dim_appearance=self.teachers[0].feature_dim,
                                align_dim_motion=self.teachers[1].feature_dim)
        return models.DeRATokenizer(mcfg)

    def _build_sacp(self):
        if self.teachers is None or self.cfg.sacp == "off":
            return None
        from dera_fast.sacp import SACP

        shared = list(self.model.shared_encoder_parameters())
        if self.cfg.sacp == "loss_reweight":
            return SACP(shared, mode="loss_reweight")
        if self.info.distributed:
            raise ValueError("sacp='project' writes .grad outside DDP's reducer and runs single-process only; "
                             "use sacp='loss_reweight' (the paper's form) under torchrun")
        ids = {id(p) for p in shared}
        return SACP(shared, mode="project", other_params=[p for p in self.model.parameters() if id(p) not in ids])

    def _build_dataset(self, mcfg):
        from dera_fast.data import SyntheticClips, VideoFolderDataset

        if self.cfg.data == "synthetic":
            return SyntheticClips(self.cfg.num_clips or None, frames=mcfg.num_frames, size=mcfg.size,
                                  value_range=mcfg.pixel_range, seed=self.cfg.seed)
        return VideoFolderDataset(self.cfg.data, frames=mcfg.num_frames, size=mcfg.size,
                                  value_range=mcfg.pixel_range, seed=self.cfg.seed)

    # ------------------------------------------------------------------ one step
    def _align_losses(self, out: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """λ-weighted DeRA alignment losses (λ_a L_a, λ_m L_m), or None for LARP / alignment off."""
        if "align_appearance" not in out or "align_motion" not in out:
            return None
        mc = self.model.config
        return (mc.align_weight_appearance * out["align_appearance"].float(),
                mc.align_weight_motion * out["align_motion"].float())

    def _backward(self, loss: torch.Tensor, align, logs: dict) -> torch.Tensor:
        """Backpropagate L_0 plus the (SACP-combined) alignment losses; returns the total for logging."""
        if align is None:
            loss.backward()
            return loss.detach()
        la, lm = align
        if self.sacp is None:
            total = loss + la + lm
            total.backward()
        elif self.sacp.mode == "loss_reweight":
            wa, wm = self.sacp.weights(la, lm)
            total = loss + wa * la + wm * lm
            logs.update(sacp_wa=wa, sacp_wm=wm)
            total.backward()
        else:
            total = loss + la + lm
            self.sacp.backward(la, lm, rest=loss)
        return total.detach()

    def train_step(self, batch: dict) -> dict[str, float]:
        """One optimisation step on ``batch["video"]`` (this rank's share); returns logged scalars."""
        cfg, step = self.cfg, self.step
        x = batch["video"].to(self.device, non_blocking=True)
        mult = schedule_mult(step, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                             min_lr_mult=cfg.min_lr_mult)
        set_lr(self.opt, cfg.lr, mult)
        with autocast(self.device, cfg.amp):
            extra = {}
            if self.teachers is not None:
                with torch.no_grad():
                    extra["targets"] = compute_targets(x, *self.teachers)
            recon, out = self.model_ddp(x, step=step, max_steps=cfg.steps, **extra)
        x01, r01 = _to01(x, self.pixel_range), _to01(recon.float(), self.pixel_range)
        logs: dict[str, Any] = {"lr": cfg.lr * mult}
        gan_on = self.use_gan and step >= cfg.gan_start

        if gan_on and step % cfg.d_update_every == 0:  # discriminator step on detached reconstructions
            set_lr(self.d_opt, cfg.d_lr, mult)
            with autocast(self.device, cfg.amp):
                logits = self.disc_ddp(torch.cat([x01, r01.detach()]))     # one pass: real and fake halves
            real, fake = logits.float().chunk(2)
            d_loss = d_loss_ns_smooth(real, fake)
            if cfg.lecam_weight > 0:
                d_loss = d_loss + cfg.lecam_weight * self.lecam(real, fake)
            self.d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.d_opt.step()
            logs.update(d_loss=d_loss.detach(), logits_real=real.mean().detach(), logits_fake=fake.mean().detach())

        loss = cfg.l1_weight * l1_loss(x01, r01)
        logs["l1"] = loss.detach() / max(cfg.l1_weight, 1e-12)
        if self.perceptual is not None:
            with autocast(self.device, cfg.amp):
                p = self.perceptual(x01, r01)
            loss = loss + cfg.perceptual_weight * p.float()
            logs["perceptual"] = p.detach()
        if gan_on:
            # NOTE: the generator pass uses the bare module, not the DDP wrapper: D gets no gradient here, and a
            # DDP forward whose parameters receive none would stall the next reduction.
            self.disc.requires_grad_(False)
            with autocast(self.device, cfg.amp):
                g = g_loss_ns(self.disc(r01))
            self.disc.requires_grad_(True)
            loss = loss + cfg.gan_weight * g
            logs["g_loss"] = g.detach()
        loss = loss + cfg.vq_weight * out["loss_q"].float()
        logs["loss_q"] = out["loss_q"].detach()
        if cfg.prior_weight > 0 and "loss_prior" in out:
            loss = loss + cfg.prior_weight * out["loss_prior"].float()
            logs["loss_prior"] = out["loss_prior"].detach()
        align = self._align_losses(out)
        if align is not None:
            logs.update(align_a=out["align_appearance"].detach(), align_m=out["align_motion"].detach())
        self.opt.zero_grad(set_to_none=True)
        total = self._backward(loss, align, logs)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        logs.update(loss=total, psnr=batch_psnr(x01, r01.detach()))
        return {k: float(v) for k, v in logs.items()}

    # ------------------------------------------------------------------ loop
    def train(self, on_log=None) -> dict[str, float]:
        """Run until ``cfg.steps``; returns the last logged (rank-averaged) scalars.

        ``on_log(step, values)`` is called on every rank after each logged step.
        """
        cfg = self.cfg

        def visualise(batch):
            if cfg.vis_every and self.step % cfg.vis_every == 0:
                self.write_grid(batch["video"][:4], self.out / "samples" / f"recon_{self.step:07d}.png")

        last = run_steps(self, desc="train tokenizer", rate_key="clips_per_s", count=lambda b: b["video"].shape[0],
                         postfix={"loss": ("loss", "{:.3f}"), "psnr": ("psnr", "{:.2f}"),
                                  "clips_s": ("clips_per_s", "{:.1f}")}, on_log=on_log, after_step=visualise)
        if self.info.is_main:
            self.export(self.out / "model")
        return last

    # ------------------------------------------------------------------ outputs
    @torch.no_grad()
    def write_grid(self, x: torch.Tensor, path: Path) -> None:
        """Rows input / reconstruction / |error|x4 (rank 0 only)."""
        if not self.info.is_main:
            return
        from dera_fast import viz

        was = self.model.training
        self.model.eval()
        recon = self.model.reconstruct(x.to(self.device)).clamp(*self.pixel_range)
        self.model.train(was)
        grid = viz.reconstruction_grid(x.cpu(), recon.cpu(), value_range=self.pixel_range)
        viz.save_video_grid(grid, path, value_range=self.pixel_range)

    def export(self, directory: Path) -> None:
        """``save_pretrained`` the trained tokenizer (EMA weights when kept, else the live ones)."""
        if self.ema is None:
            self.model.save_pretrained(directory)
            return
        live = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.ema.copy_to(self.model)
        self.model.save_pretrained(directory)
        self.model.load_state_dict(live)

    def save_checkpoint(self) -> Path | None:
        if not self.info.is_main:
            return None
        weights = {"model": self.model.state_dict()}
        if self.ema is not None:
            weights["ema"] = self.ema.state_dict()
        if self.disc is not None:
            lecam = {f"lecam.{k}": v for k, v in self.lecam.state_dict().items()}
            weights["disc"] = {**self.disc.state_dict(), **lecam}
        state = {"optimizer": self.opt.state_dict(), "data": self.stream.state_dict(),
                 "rng": ckpt.rng_state(), "step": self.step}
        if self.d_opt is not None:
            state["d_optimizer"] = self.d_opt.state_dict()
        return ckpt.save_checkpoint(self.out, self.step, weights=weights, config=self.cfg.to_dict(), state=state,
                                    keep_last=self.cfg.keep_last)

    def resume(self, path: str | Path | None = None) -> bool:
        """Restore the newest checkpoint under the run folder (or ``path``); False when there is none."""
        where = Path(path) if path else ckpt.latest_checkpoint(self.out)
        if where is None:
            return False
        step, weights, _, state = ckpt.load_checkpoint(where)
        self.model.load_state_dict(weights["model"])
        if self.ema is not None:
            self.ema.load_state_dict(weights["ema"])
        if self.disc is not None:
            d = weights["disc"]
            self.disc.load_state_dict({k: v for k, v in d.items() if not k.startswith("lecam.")})
            self.lecam.load_state_dict({k[6:]: v for k, v in d.items() if k.startswith("lecam.")})
            self.d_opt.load_state_dict(state["d_optimizer"])
        self.opt.load_state_dict(state["optimizer"])
        self.stream.load_state_dict(state["data"])
        ckpt.set_rng_state(state["rng"])
        self.step = step
        if self.info.is_main:
            log.info("resumed from %s (step %d)", where, step)
        return True
