"""``evaluate_tokenizer``: reconstruction metrics of a LARP / DeRA tokenizer on a video set, LARP's rFVD protocol.

Per clip (one per video, see :mod:`.sampling`): ``ids = encode(x)`` (eval mode: argmax codes), ``x_hat =
decode(ids)`` clamped to the pixel range, then on [0, 1] pixels PSNR ``-10 log10(MSE)``, SSIM, LPIPS (VGG, per
frame), I3D features of ``x`` and ``x_hat``; code counts for usage and perplexity. Streaming: per-clip scalars
(a few floats per clip) and O(D^2) feature statistics are all that is kept.
"""
from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

import torch

from dera_fast import metrics
from dera_fast._progress import progress_bar
from dera_fast.metrics import CodebookCounter, FeatureStats, frechet_distance

from . import protocol as P
from .sampling import ClipList, order_digest, rank_batches, rank_loader, select_clips, single_process, sync
from .stats import (cache_path, exact_means, gather_rows, load_extractor, load_real_stats, probe_extractor,
                    reduce_counts, reduce_feature_stats, save_real_stats)

log = logging.getLogger("dera_fast.eval")


def _lpips_wheel_heads() -> Path | None:
    """The lpips package's VGG linear heads (``weights/v0.1/vgg.pth``) when the wheel is installed (not imported:
    ``import lpips`` pulls in torchvision)."""
    spec = importlib.util.find_spec("lpips")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / "weights" / "v0.1" / "vgg.pth"
        if p.is_file():
            return p
    return None


def build_lpips(vgg_path, heads_path=None, device="cpu"):
    """LPIPS(VGG) from a torchvision-layout VGG16 safetensors file and linear heads: ``heads_path``
    (safetensors, keys ``lin<l>.model.1.weight``), else the installed lpips wheel's ``vgg.pth`` (read with
    ``torch.load(weights_only=True)``, the official checkpoint), else uniform ``1/C`` heads (then the metric is
    reported as ``lpips_uniform_heads``, not LPIPS). Returns ``(module, record, metric name)``.
    """
    from dera_fast.train.losses import PerceptualLoss

    vgg_path = Path(vgg_path)
    if not vgg_path.is_file():
        raise FileNotFoundError(f"LPIPS VGG weights not found: {vgg_path}")
    net = PerceptualLoss.from_weights(vgg_path, "vgg", heads_path)
    record = {"net": "vgg16", "backbone_sha256": metrics.sha256_file(vgg_path),
              "input": "[0, 1] frames, normalize=True (x -> 2x - 1); mean over all frames"}
    name = "lpips"
    if heads_path is not None:
        record.update(heads="file", heads_sha256=metrics.sha256_file(heads_path))
    elif (wheel := _lpips_wheel_heads()) is not None:
        state = torch.load(wheel, map_location="cpu", weights_only=True)
        for i, h in enumerate(net.heads):
            w = state.get(f"lin{i}.model.1.weight")
            if w is None or w.numel() != h.numel():
                raise ValueError(f"{wheel}: expected lin{i}.model.1.weight with {h.numel()} values")
            h.data.copy_(w.flatten())
        record.update(heads="lpips wheel v0.1 vgg.pth", heads_sha256=metrics.sha256_file(wheel))
    else:
        log.warning("LPIPS heads: no lpips package and no --lpips-heads file, so uniform 1/C heads are used; the "
                    "value is reported as lpips_uniform_heads and is not comparable to published LPIPS")
        record.update(heads="uniform 1/C")
        name = "lpips_uniform_heads"
    return net.to(device).eval(), record, name


def _per_video_lpips(net, x01: torch.Tensor, r01: torch.Tensor) -> torch.Tensor:
    """[B] mean LPIPS over each clip's frames (the module averages over the frames it is given)."""
    return torch.stack([net(x01[i:i + 1], r01[i:i + 1]).double() for i in range(x01.shape[0])])


@torch.no_grad()
def evaluate_tokenizer(model, data, *, i3d, root=None, lpips_vgg=None, lpips_heads=None,
                       num_videos: int | None = None, batch_size: int = 8, seed: int = 0, workers: int = 0,
                       cache_dir=None, progress: bool | None = None, info=None, model_path=None) -> dict:
    """Reconstruction metrics (PSNR, SSIM, LPIPS, rFVD, codebook usage) of ``model`` on ``data``.

    Args:
        model: a LARP / DeRA tokenizer (its device and dtype are used as they are; put in eval mode here).
        data: a LARP CSV split or a folder of videos; ``root`` resolves relative CSV paths.
        i3d: path to StyleGAN-V's I3D TorchScript (or a callable with its output: ``[B, 3, T, H, W]`` in [-1, 1]
            -> ``[B, D]``).
        lpips_vgg, lpips_heads: LPIPS backbone / heads files (see :func:`build_lpips`); no LPIPS without a backbone.
        num_videos: evaluate a seeded subset of this many videos (default: all, LARP's protocol).
        batch_size: clips per global batch (each rank runs whole global batches).
        seed: clip start frames and the subset.
        cache_dir: where the real-clip I3D statistics are cached / reused (None: no cache).
        progress: a progress bar on rank 0 (None: the package setting, ``dera_fast.set_progress_bar_config``).
        info: a ``DistInfo`` when running under torchrun (default: one process on the model's device).
        model_path: the folder the model came from (recorded with the sha256 of its weights).
    Returns:
        the result dict written by ``eval tokenizer`` (``metrics``, ``protocol``, ``throughput``, ...).
    """
    from dera_fast.data import VideoFolderDataset

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_videos is not None and num_videos < 2:
        raise ValueError(f"num_videos must be >= 2 (FVD needs two clips per side), got {num_videos}")
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    info = info or single_process(device)
    cfg = model.config
    frames, size, (lo, hi) = cfg.num_frames, cfg.size, cfg.pixel_range
    model.eval()

    ds = VideoFolderDataset(data, frames, size, train=False, value_range=(0.0, 1.0), seed=seed, root=root)
    order = select_clips(len(ds), num_videos, seed, repeat=False)
    clips = ClipList(lambda s: ds, order, seed)
    fvd = load_extractor(i3d, device)
    feature_dim = probe_extractor(fvd, frames, size)
    lp_net, lp_record, lp_name = (build_lpips(lpips_vgg, lpips_heads, device) if lpips_vgg is not None
                                  else (None, None, None))

    proto = {"task": "tokenizer reconstruction", **P.dataset_record(data, root, ds), "num_videos": len(order),
             "selection": "all" if num_videos is None else f"seeded subset ({num_videos})",
             "frames": frames, "size": size, "value_range": [0.0, 1.0],
             "clip_sampling": P.CLIP_SAMPLING, "codes": "eval mode, argmax (deterministic) quantization",
             "psnr": P.PSNR_DEF, "ssim": P.SSIM_DEF, "lpips": lp_record, "fvd": P.FVD_DEF, "fvd_size": size,
             "extractor": fvd.name, "extractor_sha256": fvd.weights_sha256, "feature_dim": feature_dim,
             "seed": seed, "cfg": None, "dtype": str(dtype).removeprefix("torch."),
             **P.provenance(info, batch_size)}
    key = {"format": 1, "clips": "real", "dataset_digest": proto["dataset_digest"], "split": proto["split"],
           "order_sha256": order_digest(order), "seed": seed, "frames": frames, "size": size, "fvd_size": size,
           "clip_sampling": P.CLIP_SAMPLING, "extractor_sha256": fvd.weights_sha256, "feature_dim": feature_dim}
    cpath = cache_path(cache_dir, key) if cache_dir is not None and fvd.weights_sha256 else None
    cached = load_real_stats(cpath, key) if cpath is not None else None

    batches = rank_batches(len(order), batch_size, info.rank, info.world_size)
    loader = rank_loader(clips, batches, workers, pin_memory=device.type == "cuda")
    counter = CodebookCounter(model.codebook_size)
    real, fake = FeatureStats(), FeatureStats()
    rows, psnr_sum, n_local, model_s = [], 0.0, 0, 0.0
    bar = progress_bar(total=sum(len(p) for _, p in batches), unit="clip",
                       unit_scale=info.world_size if info.distributed else False,  # ~ all ranks' clips
                       desc="eval tokenizer", progress=progress if info.is_main else False)
    sync(device)
    t_start = time.perf_counter()
    for batch in loader:
        x01 = batch["video"].to(device, torch.float32, non_blocking=True)  # [b, 3, T, S, S] in [0, 1]
        sync(device)
        t0 = time.perf_counter()
        ids = model.encode((lo + x01 * (hi - lo)).to(dtype))
        recon = model.decode(ids)
        sync(device)
        model_s += time.perf_counter() - t0
        r01 = ((recon.float() - lo) / (hi - lo)).clamp(0, 1)
        counter.update(ids)
        mse = (x01.double() - r01.double()).pow(2).flatten(1).mean(1)  # [b]
        cols = [batch["position"].double(), mse.cpu(), (-10 * torch.log10(mse)).cpu(),
                metrics.ssim(x01, r01, value_range=(0, 1), reduction="none").double().cpu()]
        if lp_net is not None:
            cols.append(_per_video_lpips(lp_net, x01, r01).cpu())
        rows.append(torch.stack(cols, 1))
        fake.update(fvd.features(r01))
        if cached is None:
            real.update(fvd.features(x01))
        psnr_sum += float(cols[2].sum())
        n_local += x01.shape[0]
        bar.update(x01.shape[0])
        bar.set_postfix(psnr=f"{psnr_sum / n_local:.2f}")
    bar.close()
    sync(device)
    wall = time.perf_counter() - t_start

    columns = ["position", "mse", "psnr", "ssim"] + ([lp_name] if lp_net is not None else [])
    local = torch.cat(rows) if rows else torch.zeros(0, len(columns), dtype=torch.float64)
    per_clip = gather_rows(local, info)
    counter.counts = reduce_counts(counter.counts, info)
    fake = reduce_feature_stats(fake, info)
    real = cached[0] if cached is not None else reduce_feature_stats(real, info)
    totals = reduce_counts(torch.tensor([wall, model_s], dtype=torch.float64), info)
    if cpath is not None and cached is None and info.is_main:
        save_real_stats(cpath, key, real, None, info.world_size)

    means = exact_means(per_clip[:, 1:], columns[1:])
    code = counter.compute()
    m = {"psnr": means["psnr"], "ssim": means["ssim"], **({lp_name: means[lp_name]} if lp_net else {}),
         "rfvd": frechet_distance(fake.mean(), fake.cov(), real.mean(), real.cov()), "mse": means["mse"],
         "codebook_usage": code["usage"], "codebook_perplexity": code["perplexity"], "codebook_used": code["used"],
         "codebook_dead": code["dead"], "codebook_entropy_bits": code["entropy_bits"], "num_videos": len(order)}
    n = len(order)
    throughput = {"wall_s": wall, "clips_per_s": n / wall if wall > 0 else None,
                  "tokenizer_clips_per_s_per_device": n / float(totals[1]) if float(totals[1]) > 0 else None,
                  "ranks_wall_s_sum": float(totals[0])}
    return {"kind": "dera_fast.eval/tokenizer", "format_version": P.FORMAT_VERSION, "metrics": m,
            "protocol": proto, "throughput": throughput, "models": {"tokenizer": P.model_record(model_path, model)},
            "real_stats": {"path": None if cpath is None else str(cpath), "reused": cached is not None,
                           "num_items": real.num_items}}
