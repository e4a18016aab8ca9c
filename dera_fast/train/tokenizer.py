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

from dera_fast.models.pretrained import load_state_dict_strict
from dera_fast.models.teachers import RandomTeacher, compute_targets

from .._config import PresetConfig
from . import checkpoint as ckpt
from .distributed import DistInfo, init_distributed
from .loop import Trainer, autocast, run_steps
from .losses import LeCam, TransformerDiscriminator, build_perceptual, d_loss_ns_smooth, g_loss_ns, l1_loss
from .optim import EMA, make_adam, param_groups, schedule_mult, set_lr

log = logging.getLogger("dera_fast.train")


@dataclass(kw_only=True)
class TokenizerTrainConfig(PresetConfig):
    """Everything a tokenizer run needs; JSON-serialisable (``--config cfg.json`` holds these fields)."""
    _kind = "tokenizer training"
    _positive = ("batch_size", "d_lr", "log_every", "d_update_every", "disc_dim", "disc_depth", "disc_heads", "lr")
    _non_negative = ("num_clips", "epochs", "warmup_epochs", "warmup_steps", "min_lr_mult", "prior_lr_mult",
                     "grad_clip", "l1_weight", "perceptual_weight", "gan_weight", "gan_start", "lecam_weight",
                     "vq_weight", "prior_weight", "ema_decay", "vis_every", "ckpt_every", "ckpt_minutes", "keep_last",
                     "mse_weight", "vq_restart_after", "vq_entropy_weight", "vq_temperature")

    model: str = "tiny"                   # TokenizerConfig preset
    model_overrides: dict = field(default_factory=dict)
    arch: str = "dera"                    # "dera" | "larp"
    init_from: str | None = None          # start from these weights (a save_pretrained folder or model.safetensors
                                          # of the same architecture): fine-tuning, no k-means re-initialisation
    data: str = "synthetic"               # "synthetic", "samples" (real clips, training split), a folder of videos,
                                          # or a LARP-format CSV
    num_clips: int = 0                    # synthetic / samples only; 0 = the dataset's default
    crop_scale: tuple[float, float] = (0.5, 1.0)  # samples only: crop side range, fraction of the short side
    batch_size: int = 8                   # global batch (per rank = batch_size / world size)
    steps: int = 1000
    epochs: float = 0.0                   # > 0: steps = epochs x steps per epoch, at run time (LARP's max_epoch)
    recipe: str = "larp"                  # fills the fields left at None below from RECIPES[recipe]
    lr: float | None = None
    d_lr: float = 3e-5
    betas: tuple[float, float] | None = None
    warmup_steps: int | None = None
    warmup_epochs: float = 0.0            # > 0: warmup_steps derived the same way (LARP's warmup_epoch)
    min_lr_mult: float = 0.01
    prior_lr_mult: float = 1.0            # LARP paper: 50 (its released trainer loses it after step 0)
    grad_clip: float = 0.0                # 0 = off (LARP default)
    l1_weight: float | None = None
    mse_weight: float | None = None       # squared error on [0, 1] pixels (what PSNR measures)
    perceptual_weight: float = 1.0        # active only when perceptual_weights is set
    perceptual_net: str = "vgg"           # "vgg" | "alex"
    perceptual_weights: str | None = None  # local torchvision-layout .safetensors backbone
    perceptual_heads: str | None = None   # lpips linear heads file; None: the lpips wheel's; "uniform": 1 / C
    gan_weight: float = 0.3
    gan_start: int = 0                    # first step with the GAN terms
    d_update_every: int = 5
    disc_dim: int = 512
    disc_depth: int = 12
    disc_heads: int = 8
    # LARP's effective LeCam weight: its config's 0.001 is multiplied in twice in models/loss.py (losses.LeCam)
    lecam_weight: float = 1e-6
    lecam_decay: float = 0.999
    vq_weight: float = 0.1
    vq_kmeans_init: bool | None = None    # codebook health (models.quantizer): k-means init from the first batch
    vq_restart_after: int | None = None   # restart codes unused for this many steps (0 = off)
    vq_entropy_weight: float | None = None  # LARP's entropy loss, inside loss_q (0 = off, LARP's default)
    vq_temperature: float | None = None   # SVQ sampling temperature in training; 0 = the model config's
    prior_weight: float | None = None     # the AR-prior loss (LARP: 0.06); 0 switches it off
    align: bool = True                    # DeRA alignment losses (weights from the model config)
    sacp: str = "loss_reweight"           # "loss_reweight" | "project" | "off"
    teacher_image: str | None = None      # local image-teacher weights (.safetensors / official .pth)
    teacher_image_arch: str = "dinov3-b16"  # preset of models.teachers.IMAGE_TEACHERS for teacher_image
    teacher_video: str | None = None      # local video-teacher weights (.safetensors / official .pth)
    teacher_video_arch: str = "internvideo2-b14"  # preset of models.teachers.VIDEO_TEACHERS for teacher_video
    teachers: str = "files"               # "files": DeRA refuses to train without both teacher files;
                                          # "random": seeded random stand-ins where a file is missing (smoke tests)
    ema_decay: float = 0.0                # 0 = no EMA weights
    amp: str = "auto"                     # bf16 autocast on CUDA unless "off"
    seed: int = 0
    num_workers: int | None = None        # DataLoader workers per rank; None = min(8, CPU cores per rank)
    log_every: int = 10
    vis_every: int = 0                    # reconstruction grid every N steps (0 = only at the end)
    ckpt_every: int = 1000                # checkpoint every N steps (0: off) ...
    ckpt_minutes: float = 30.0            # ... and every N minutes of wall time (0: off); always at the end
    keep_last: int = 3                    # checkpoints kept (0: all)

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {self.recipe!r}")
        for name, value in RECIPES[self.recipe].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.betas = tuple(self.betas)
        if self.arch not in ("dera", "larp"):
            raise ValueError(f"arch must be 'dera' or 'larp', got {self.arch!r}")
        if self.sacp not in ("loss_reweight", "project", "off"):
            raise ValueError(f"sacp must be loss_reweight, project or off, got {self.sacp!r}")
        if self.teachers not in ("files", "random"):
            raise ValueError(f"teachers must be 'files' or 'random', got {self.teachers!r}")
        if self.epochs < 0 or self.warmup_epochs < 0:
            raise ValueError(f"epochs and warmup_epochs must be >= 0, got {self.epochs}, {self.warmup_epochs}")
        for name in ("batch_size", "d_update_every") + (() if self.epochs > 0 else ("steps",)):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        return PRESETS  # the table below


# Named recipes: the values a config takes for the fields it leaves at None (explicit values win).
RECIPES: dict[str, dict[str, Any]] = {
    # LARP's released tokenizer recipe (SPEC §2.7): Adam (0.5, 0.9) as for a GAN, no codebook health
    "larp": dict(lr=1e-4, betas=(0.5, 0.9), warmup_steps=0, l1_weight=1.0, mse_weight=0.0, prior_weight=0.06,
                 vq_kmeans_init=False, vq_restart_after=0, vq_entropy_weight=0.0, vq_temperature=0.0),
    # LARP's optimisation and losses with codebook health: k-means initialisation and dead-code restarts
    "larp-vq": dict(lr=1e-4, betas=(0.5, 0.9), warmup_steps=0, l1_weight=1.0, mse_weight=0.0, prior_weight=0.06,
                    vq_kmeans_init=True, vq_restart_after=20, vq_entropy_weight=0.0, vq_temperature=0.0),
    # small-scale recipe, measured on the real clips (bench/recipe_sweep.py, bench/results/recipe/tiny.md): Adam
    # (0.9, 0.99) at 2e-3, squared error (what PSNR measures), near-argmax SVQ (tau 0.03 adds so much sampling noise
    # that the decoder learns to ignore the codes), k-means + restarts (without both: 9 of 64 codes), no AR prior
    # (it pulls the few codes towards predictability before they carry content: -1.5 dB at 1200 tiny steps)
    "fast": dict(lr=2e-3, betas=(0.9, 0.99), warmup_steps=20, l1_weight=0.0, mse_weight=1.0, prior_weight=0.0,
                 vq_kmeans_init=True, vq_restart_after=20, vq_entropy_weight=0.0, vq_temperature=0.001),
}

PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized: the tiny model and a small discriminator, with the small-scale recipe (1200 steps: well clear of
    # collapse on the real clips, tests/test_collapse.py; whole-frame crops with data="samples"). The GAN starts late
    # and light: at this size it mostly fights the pixel loss (measured: weight 0.05 from mid-run cost ~2 dB PSNR).
    "tiny": dict(model="tiny", recipe="fast", batch_size=8, steps=1200, crop_scale=(1.0, 1.0), d_lr=2e-4,
                 disc_dim=32, disc_depth=2, disc_heads=2, gan_weight=0.01, gan_start=960, log_every=10,
                 teachers="random", ckpt_every=200),  # CPU smoke runs align with seeded random teachers
    # The demo's tokenizer on the real sample clips (training split, whole-frame crops), small-scale recipe, no GAN /
    # prior / alignment (without teacher files the alignment targets would be random). `python -m dera_fast demo`
    # trains it from scratch within a time budget; `train tokenizer --preset demo` runs its 8000 steps in full.
    "demo": dict(model="demo", recipe="fast", data="samples", crop_scale=(1.0, 1.0), batch_size=16, steps=8000,
                 gan_weight=0.0, align=False, log_every=50, ckpt_every=1000, ckpt_minutes=10.0),
    # LARP-L-long (scripts/train_larp_tokenizer_reproduce.sh): 150 epochs with 8 warm-up at global batch 128,
    # steps derived from the data at run time (UCF-101 + K600 train: ~3.4x the old fixed 150k steps).
    "larp-l": dict(model="larp-l", arch="larp", batch_size=128, epochs=150, warmup_epochs=8, align=False,
                   sacp="off"),
    # DeRA (SPEC §3.8): LARP's recipe plus alignment with SACP against DINOv3-B/16 and InternVideo2-B/14 (teacher
    # files required), with codebook health (k-means init, dead-code restarts; `--set recipe=larp` for none).
    # 75 epochs: the paper's two-stage ablation (20 + 55 epochs); it states no main-run length.
    "dera-l": dict(model="dera-l", arch="dera", recipe="larp-vq", batch_size=128, epochs=75, warmup_epochs=8),
}


def build_teachers(mcfg, cfg: TokenizerTrainConfig) -> tuple:
    """(image teacher, video teacher) from the local files ``cfg.teacher_image`` / ``cfg.teacher_video``
    (``models.teachers.load_image_teacher`` / ``load_video_teacher`` with the ``*_arch`` presets). A missing file
    is an error unless ``cfg.teachers == "random"``, which puts a seeded random stand-in in its place."""
    from dera_fast.models import teachers as T

    missing = [flag for flag, path in (("--teacher-image", cfg.teacher_image), ("--teacher-video", cfg.teacher_video))
               if not path]
    if missing and cfg.teachers != "random":
        raise ValueError(f"DeRA aligns with frozen teachers but {' and '.join(missing)} (teacher_image / "
                         f"teacher_video) not given: pass local DINOv3-B/16 and InternVideo2-B/14 weights (official "
                         f".pth files convert with `dera_fast convert-teacher`), or --teachers random for seeded "
                         f"random stand-ins (smoke tests only)")

    def random(kind, dim, seed):
        return T.RandomTeacher(kind, seed=seed, dim=dim, frames=mcfg.num_frames, size=mcfg.size, patch=mcfg.patch,
                               tubelet=mcfg.patch_t, pixel_range=mcfg.pixel_range)

    image = (T.load_image_teacher(cfg.teacher_image, cfg.teacher_image_arch, pixel_range=mcfg.pixel_range)
             if cfg.teacher_image else random("image", mcfg.align_dim_appearance, cfg.seed + 101))
    video = (T.load_video_teacher(cfg.teacher_video, cfg.teacher_video_arch, pixel_range=mcfg.pixel_range)
             if cfg.teacher_video else random("video", mcfg.align_dim_motion, cfg.seed + 202))
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


class TokenizerTrainer(Trainer):
    """Builds model, discriminator, optimisers and data from a :class:`TokenizerTrainConfig` and trains.

    Args:
        cfg: the run's config.
        out_dir: run folder (checkpoints/, metrics.jsonl, samples/, model/).
        device: "auto" | "cpu" | "cuda".
        progress: draw a tqdm bar (rank 0 only; None: the package setting, ``dera_fast.set_progress_bar_config``).
        dataset: optional dataset override (items ``{"video", "label", ...}`` in the model's pixel range).
    """

    def __init__(self, cfg: TokenizerTrainConfig, out_dir: str | Path, *, device: str = "auto",
                 progress: bool | None = None, dataset=None):
        from dera_fast.models import TokenizerConfig

        self.cfg, self.out = cfg, Path(out_dir)
        self.info: DistInfo = init_distributed(device)
        self.device = self.info.device
        if cfg.batch_size % self.info.world_size:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by world size {self.info.world_size}")
        ckpt.seed_everything(cfg.seed + self.info.rank)
        mcfg = TokenizerConfig.from_name(cfg.model, **cfg.model_overrides)
        if cfg.prior_weight <= 0:  # no prior at all: an unused prior would also stall DDP's gradient reduction
            mcfg = mcfg.replace(prior_depth=0)
        self.model = self._build_model(mcfg).to(self.device).train()
        if cfg.init_from:
            self._load_init_weights(cfg.init_from)
        # a trained codebook is never re-initialised by k-means
        self.model.quantizer.set_codebook_health(kmeans_init=cfg.vq_kmeans_init and not cfg.init_from,
                                                 restart_after=cfg.vq_restart_after,
                                                 entropy_weight=cfg.vq_entropy_weight)
        self.model.quantizer.distributed = self.info.distributed
        if cfg.vq_temperature > 0:  # a training-time setting: eval and the exported config keep the model's
            self.model.quantizer.temperature = cfg.vq_temperature
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
        self._start_run(self.dataset, progress)

    # ------------------------------------------------------------------ construction
    def _build_model(self, mcfg):
        from dera_fast import models

        self.teachers = None
        if self.cfg.arch == "larp":
            return models.LARPTokenizer(mcfg)
        if self.cfg.align:
            self.teachers = build_teachers(mcfg, self.cfg)
            self.random_teachers = sum(isinstance(t, RandomTeacher) for t in self.teachers)
            # the alignment heads project to the teachers' feature widths
            mcfg = mcfg.replace(align_dim_appearance=self.teachers[0].feature_dim,
                                align_dim_motion=self.teachers[1].feature_dim)
        return models.DeRATokenizer(mcfg)

    def _load_init_weights(self, path: str) -> None:
        """Copy a saved tokenizer's weights into the freshly built model (same architecture, strict keys)."""
        from dera_fast.models.pretrained import load_tensors, read_header

        header = read_header(path)
        if header["model_type"] != self.model.model_type:
            raise ValueError(f"init_from {path} holds a {header['model_type']!r} tokenizer, this run trains "
                             f"{self.model.model_type!r}")
        load_state_dict_strict(self.model, load_tensors(header["weights"], self.device), source=str(path))
        log.info("initialised from %s", path)

    def _build_sacp(self):
        if self.teachers is None or self.cfg.sacp == "off":
            return None
        from .sacp import SACP

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
        if self.cfg.data == "samples":
            from dera_fast.data import SampleVideoClips

            return SampleVideoClips("train", mcfg.num_frames, mcfg.size, num_clips=self.cfg.num_clips or None,
                                    scale=self.cfg.crop_scale, value_range=mcfg.pixel_range, seed=self.cfg.seed)
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

        l1 = l1_loss(x01, r01)
        loss = cfg.l1_weight * l1
        logs["l1"] = l1.detach()
        if cfg.mse_weight > 0:
            mse = (x01 - r01).pow(2).mean()
            loss = loss + cfg.mse_weight * mse
            logs["mse"] = mse.detach()
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
        if "loss_entropy" in out:
            logs["loss_entropy"] = out["loss_entropy"].detach()
        logs.update(self.model.quantizer.usage_tensors())  # tensors: no device sync on the steps not logged
        if cfg.prior_weight > 0 and "loss_prior" in out:
            loss = loss + cfg.prior_weight * out["loss_prior"].float()
            logs["loss_prior"] = out["loss_prior"].detach()
        align = self._align_losses(out)
        if align is not None:
            logs.update(align_a=out["align_appearance"].detach(), align_m=out["align_motion"].detach())
        self.opt.zero_grad(set_to_none=True)
        total = self._backward(loss, align, logs)
        self._optimizer_step()
        logs.update(loss=total, psnr=batch_psnr(x01, r01.detach()))
        if self.teachers is not None:  # how many alignment teachers are seeded random stand-ins (0, 1 or 2)
            logs["teachers_random"] = self.random_teachers
        return {k: float(v) for k, v in logs.items()}

    # ------------------------------------------------------------------ loop
    def train(self, on_log=None) -> dict[str, float]:
        """Run until ``cfg.steps``; returns the last logged (rank-averaged) scalars.

        ``on_log(step, values)`` is called on every rank after each logged step.
        """
        cfg = self.cfg
        if self.info.is_main and self.schedule:
            self.metrics.write(self.step, {"schedule_" + k: v for k, v in self.schedule.items()})

        def visualise(batch):
            if cfg.vis_every and self.step % cfg.vis_every == 0:
                self.write_grid(batch["video"][:4], self.out / "samples" / f"recon_{self.step:07d}.png")

        last = run_steps(self, desc="train tokenizer", rate_key="clips_per_s", count=lambda b: b["video"].shape[0],
                         postfix={"loss": ("loss", "{:.3f}"), "psnr": ("psnr", "{:.2f}"),
                                  "codes": ("vq_used", "{:.0%}"), "clips_s": ("clips_per_s", "{:.1f}")},
                         on_log=on_log, after_step=visualise)
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
        """Checkpoint on rank 0, every rank's RNG state included (collective under torchrun)."""
        rngs = ckpt.gather_rng_states(self.info)
        if not self.info.is_main:
            return None
        weights = {"model": self.model.state_dict()}
        if self.ema is not None:
            weights["ema"] = self.ema.state_dict()
        if self.disc is not None:
            lecam = {f"lecam.{k}": v for k, v in self.lecam.state_dict().items()}
            weights["disc"] = {**self.disc.state_dict(), **lecam}
        state = {"optimizer": self.opt.state_dict(), "data": self.stream.state_dict(), "rng": rngs[0],
                 "rng_ranks": rngs, "step": self.step, "quantizer": self.model.quantizer.health_state_dict()}
        if self.d_opt is not None:
            state["d_optimizer"] = self.d_opt.state_dict()
        return ckpt.save_checkpoint(self.out, self.step, weights=weights, config=self.cfg.to_dict(), state=state,
                                    keep_last=self.cfg.keep_last, model=self._identity())

    def resume(self, path: str | Path | None = None) -> bool:
        """Restore the newest intact checkpoint under the run folder (or ``path``); False when there is none.

        Damaged newer checkpoints are skipped with a warning; a checkpoint of another model type or architecture, or
        without the EMA / discriminator this run keeps, is refused (ValueError). Collective under torchrun.
        """
        opened = self._open_checkpoint(path)
        if opened is None:
            return False
        where, step, weights, state = opened
        for name, needed, why in (("ema", self.ema is not None, "ema_decay was 0"),
                                  ("disc", self.disc is not None, "gan_weight was 0")):
            if needed and name not in weights:
                raise ValueError(f"cannot resume {where}: it has no {name} weights ({why} when it was written); "
                                 f"resume with the run's own config")
        load_state_dict_strict(self.model, weights["model"], source=str(where / "model.safetensors"))
        if self.ema is not None:
            self.ema.load_state_dict(weights["ema"])
        if self.disc is not None:
            d = weights["disc"]
            self.disc.load_state_dict({k: v for k, v in d.items() if not k.startswith("lecam.")})
            self.lecam.load_state_dict({k[6:]: v for k, v in d.items() if k.startswith("lecam.")})
            self.d_opt.load_state_dict(state["d_optimizer"])
        self.opt.load_state_dict(state["optimizer"])
        self.stream.load_state_dict(state["data"])
        if "quantizer" in state:  # checkpoints before codebook health have none
            self.model.quantizer.load_health_state_dict(state["quantizer"])
        return self._finish_resume(where, step, state)
