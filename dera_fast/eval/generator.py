"""``evaluate_generator``: gFVD of a class-conditional generator, or FP FVD of a frame-prediction one (LARP's
sampling protocol, SPEC.md §6.2).

* Class-conditional: ``num_samples`` real clips are drawn from the data (seeded; see :mod:`.sampling`), and one
  clip is generated for each with that clip's label, so the labels follow the data's class frequencies. CFG,
  temperature, top-k / top-p as given. gFVD compares the generated clips with those real clips.
* Frame prediction: the first ``context_frames`` frames of each real clip, padded to the clip length by repeating
  the last one (LARP's ``repeat_to_m_frames``), are tokenized as the context; all tokens of the clip are generated.
  Real and generated clips are resized to ``fp_size`` (LARP: 64) before I3D; FVD over the full clips.

Sampling runs through :func:`dera_fast.generate.generate` one global batch at a time with the seed
``derive_seed(seed, batch number, 2)``; the last batch is padded to the full batch size, so every call has the
same shape (one compiled graph) and a sample does not depend on the number of processes.
"""
from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from dera_fast._progress import progress_bar
from dera_fast.metrics import FeatureStats, frechet_distance

from . import protocol as P
from .sampling import (ClipList, derive_seed, order_digest, rank_batches, rank_loader, select_clips, single_process,
                       sync)
from .stats import (cache_path, load_extractor, load_real_stats, probe_extractor, reduce_counts,
                    reduce_feature_stats, save_real_stats)

log = logging.getLogger("dera_fast.eval")

FP_CONTEXT = ("the first context_frames frames of the real clip, padded to the clip length by repeating the last "
              "frame, tokenized; all tokens of the clip generated")


def _pad_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """Pad dim 0 to ``n`` rows by repeating the last row."""
    return t if t.shape[0] == n else torch.cat([t, t[-1:].expand(n - t.shape[0], *t.shape[1:])])


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """[B, 3, T, H, W] -> [B, 3, T, size, size], bilinear with antialias (torchvision ``Resize`` on tensors)."""
    if not size or tuple(x.shape[-2:]) == (size, size):
        return x
    b, c, t, h, w = x.shape
    frames = x.transpose(1, 2).reshape(b * t, c, h, w)  # [B*T, 3, H, W]
    out = F.interpolate(frames, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.reshape(b, t, c, size, size).transpose(1, 2)


def check_pair(generator, tokenizer) -> None:
    g = generator.config
    if g.vocab_size != tokenizer.codebook_size or g.max_seq_len != tokenizer.tokens_per_clip:
        raise ValueError(f"generator ({g.max_seq_len} tokens over {g.vocab_size} codes) does not match the "
                         f"tokenizer ({tokenizer.tokens_per_clip} over {tokenizer.codebook_size})")
    if g.frame_prediction and g.context_len != tokenizer.tokens_per_clip:
        raise ValueError(f"the frame-prediction generator takes {g.context_len} context tokens; the tokenizer "
                         f"gives {tokenizer.tokens_per_clip} per clip")


@torch.no_grad()
def evaluate_generator(generator, tokenizer, data, *, i3d, root=None, num_samples: int | None = None,
                       cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       context_frames: int = 5, fp_size: int | None = 64, batch_size: int = 32, seed: int = 42,
                       compile: bool = False, workers: int = 0, cache_dir=None, progress: bool | None = None, info=None,
                       model_paths: dict | None = None) -> dict:
    """gFVD (class-conditional) or FP FVD (frame prediction) of ``generator`` decoded by ``tokenizer``.

    Args:
        generator, tokenizer: an ``ARGenerator`` and its tokenizer, on one device (dtypes used as they are).
        data: CSV split or folder of videos (real clips; contexts in frame prediction); ``root`` for CSV paths.
        i3d: I3D TorchScript path or a callable extractor (see :func:`.evaluate_tokenizer`).
        num_samples: generated clips (default LARP's: 10,000 class-conditional, 50,000 frame prediction).
        cfg_scale, temperature, top_k, top_p: sampling (frame prediction: cfg_scale must be 1).
        context_frames: frame prediction: real frames given as context (LARP: 5).
        fp_size: frame prediction: both sides resized to this before I3D (LARP: 64; None = no resize).
        batch_size, seed, compile, workers, cache_dir, progress, info: as in :func:`.evaluate_tokenizer`;
            ``compile`` compiles the decode step (dera_fast.generate).
        model_paths: ``{"generator": folder, "tokenizer": folder}`` for the record.
    """
    from dera_fast.data import VideoFolderDataset
    from dera_fast.generate import generate

    fp = bool(generator.config.frame_prediction)
    num_samples = num_samples if num_samples is not None else (50_000 if fp else 10_000)
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 (FVD needs two clips per side), got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if fp and cfg_scale != 1.0:
        raise ValueError("frame prediction has no classifier-free guidance: cfg must be 1.0 (LARP's protocol)")
    check_pair(generator, tokenizer)
    tcfg = tokenizer.config
    frames, size, (lo, hi) = tcfg.num_frames, tcfg.size, tcfg.pixel_range
    if fp and not 1 <= context_frames <= frames:
        raise ValueError(f"context_frames must be in [1, {frames}], got {context_frames}")
    fvd_size = (fp_size or size) if fp else size
    param = next(tokenizer.parameters())
    device, tok_dtype = param.device, param.dtype
    info = info or single_process(device)
    tokenizer.eval()
    generator.eval()

    def make(s):
        return VideoFolderDataset(data, frames, size, train=False, value_range=(0.0, 1.0), seed=s, root=root)

    ds = make(seed)
    order = select_clips(len(ds), num_samples, seed, repeat=True)
    clips = ClipList(lambda s: ds if s == seed else make(s), order, seed)
    if not fp:
        classes = getattr(ds, "classes", None)
        if classes is not None and len(classes) == 0:
            raise ValueError(f"{data}: the videos have no class labels (CSV 'action' column, UCF-style names or "
                             f"class sub-folders); a class-conditional generator needs them")
        if classes is not None and len(classes) > generator.config.num_classes:
            raise ValueError(f"{data} has {len(classes)} classes but the generator knows "
                             f"{generator.config.num_classes}")
    fvd = load_extractor(i3d, device)
    feature_dim = probe_extractor(fvd, frames, fvd_size)

    proto = {"task": "generator frame prediction (FP FVD)" if fp else "generator class-conditional (gFVD)",
             **P.dataset_record(data, root, ds), "num_videos": num_samples,
             "selection": "seeded permutations of all videos, fresh random clip starts per pass",
             "frames": frames, "size": size, "value_range": [0.0, 1.0],
             "clip_sampling": P.CLIP_SAMPLING, "fvd": P.FVD_DEF, "fvd_size": fvd_size,
             "labels": None if fp else "labels of the real clips (the data's class frequencies)",
             "context": f"{FP_CONTEXT} (context_frames={context_frames})" if fp else None,
             "cfg": cfg_scale, "temperature": temperature, "top_k": top_k, "top_p": top_p,
             "sampling_seed": "derive_seed(seed, global batch, 2) per global batch of batch_size",
             "extractor": fvd.name, "extractor_sha256": fvd.weights_sha256, "feature_dim": feature_dim,
             "seed": seed, "dtype": str(next(generator.parameters()).dtype).removeprefix("torch."),
             "tokenizer_dtype": str(tok_dtype).removeprefix("torch."), **P.provenance(info, batch_size),
             "compile": bool(compile)}
    key = {"format": 1, "clips": "real", "dataset_digest": proto["dataset_digest"], "split": proto["split"],
           "order_sha256": order_digest(order), "seed": seed, "frames": frames, "size": size, "fvd_size": fvd_size,
           "clip_sampling": P.CLIP_SAMPLING, "extractor_sha256": fvd.weights_sha256, "feature_dim": feature_dim}
    cpath = cache_path(cache_dir, key) if cache_dir is not None and fvd.weights_sha256 else None
    cached = load_real_stats(cpath, key) if cpath is not None else None
    if cached is not None and not fp and (cached[1] is None or cached[1].numel() != num_samples):
        cached = None  # class-conditional needs the labels from the cache

    batches = rank_batches(num_samples, batch_size, info.rank, info.world_size)
    # Class-conditional with cached real statistics needs no video: the labels come from the cache.
    loader = iter(rank_loader(clips, batches, workers, device.type == "cuda")) if (fp or cached is None) else None
    real, fake = FeatureStats(), FeatureStats()
    labels_all = torch.full((num_samples,), -1, dtype=torch.int64)
    gen_tokens, gen_s = 0.0, 0.0
    bar = progress_bar(total=sum(len(p) for _, p in batches), unit="clip",
                       unit_scale=info.world_size if info.distributed else False,  # ~ all ranks' clips
                       desc="eval generator", progress=progress if info.is_main else False)
    sampling = dict(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p, batch_size=batch_size,
                    compile=compile, progress=False)
    sync(device)
    t_start = time.perf_counter()
    for k, pos in batches:
        batch = next(loader) if loader is not None else None
        x01 = None if batch is None else batch["video"].to(device, torch.float32, non_blocking=True)
        kw = dict(sampling, seed=derive_seed(seed, k, 2))  # the batch's seed: the same in every world size
        if fp:
            ctx = x01[:, :, :context_frames]
            ctx = torch.cat([ctx, ctx[:, :, -1:].expand(-1, -1, frames - context_frames, -1, -1)], dim=2)
            ctx_ids = tokenizer.encode((lo + ctx * (hi - lo)).to(tok_dtype))  # [b, L]
            out = generate(generator, context_ids=_pad_rows(ctx_ids, batch_size), **kw)
        else:
            labels = cached[1][pos] if batch is None else batch["label"]
            if int(labels.min()) < 0:
                raise ValueError(f"{data}: some videos have no class label; a class-conditional generator needs one "
                                 f"per video")
            labels_all[pos] = labels
            out = generate(generator, class_labels=_pad_rows(labels.to(device), batch_size), **kw)
        gen_tokens += out.stats["decode_tokens"]
        gen_s += out.stats["decode_s"]
        video = tokenizer.decode(out.ids[: len(pos)])
        r01 = ((video.float() - lo) / (hi - lo)).clamp(0, 1)
        fake.update(fvd.features(_resize(r01, fvd_size if fp else None)))
        if cached is None:
            real.update(fvd.features(_resize(x01, fvd_size if fp else None)))
        bar.update(len(pos))
        if gen_s > 0:
            bar.set_postfix(tok_s=f"{gen_tokens / gen_s:.0f}")
    bar.close()
    sync(device)
    wall = time.perf_counter() - t_start

    fake = reduce_feature_stats(fake, info)
    real = cached[0] if cached is not None else reduce_feature_stats(real, info)
    if not fp and cached is None:  # labels: each position written by exactly one rank, -1 elsewhere
        labels_all = (reduce_counts(labels_all + 1, info) - 1).long()
    totals = reduce_counts(torch.tensor([gen_tokens, gen_s], dtype=torch.float64), info)
    if cpath is not None and cached is None and info.is_main:
        save_real_stats(cpath, key, real, None if fp else labels_all, info.world_size)

    value = frechet_distance(fake.mean(), fake.cov(), real.mean(), real.cov())
    m = {("fp_fvd" if fp else "gfvd"): value, "num_samples": num_samples, "num_real": real.num_items}
    if not fp:
        used = labels_all if cached is None else cached[1]
        m["num_classes_sampled"] = int(used.unique().numel())
    throughput = {"wall_s": wall, "samples_per_s": num_samples / wall if wall > 0 else None,
                  "generate_tokens_per_s_per_device": float(totals[0] / totals[1]) if float(totals[1]) > 0
                  else None}
    paths = model_paths or {}
    return {"kind": "dera_fast.eval/generator", "format_version": P.FORMAT_VERSION, "metrics": m, "protocol": proto,
            "throughput": throughput,
            "models": {"generator": P.model_record(paths.get("generator"), generator),
                       "tokenizer": P.model_record(paths.get("tokenizer"), tokenizer)},
            "real_stats": {"path": None if cpath is None else str(cpath), "reused": cached is not None,
                           "num_items": real.num_items}}
