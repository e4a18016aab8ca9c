"""Regression test against codebook collapse (issue 23): the default tiny preset, trained from scratch on the real
sample clips, ends with codes in use, reconstructions that differ across clips, and a held-out PSNR well above the
untrained model's. LARP's own recipe on the same budget collapses (bench/results/recipe/tiny.md)."""
import json

import pytest
import torch

from dera_fast.data import MissingDependencyError

STEPS = 1200  # the tiny preset's length; ~40 s single-threaded on an idle CI core


def _heldout(cfg, scale, n=32):
    """The held-out split (last 30% of each clip's frames), cropped as the training data."""
    from dera_fast.data import SampleVideoClips

    ds = SampleVideoClips("heldout", cfg.num_frames, cfg.size, num_clips=n, value_range=cfg.pixel_range,
                          scale=scale)
    return torch.stack([ds[i]["video"] for i in range(len(ds))])


@torch.no_grad()
def _measure(model, x):
    from dera_fast import metrics

    was = model.training
    model.eval()
    ids = model.encode(x)
    recon = model.decode(ids).clamp(*model.config.pixel_range)
    model.train(was)
    return {"psnr": float(metrics.psnr(x, recon, value_range=model.config.pixel_range)),
            "codes": ids.unique().numel() / model.codebook_size,
            "std_ratio": float(recon.std(0).mean() / x.std(0).mean())}


def test_tiny_preset_learns_on_real_clips_without_collapse(tmp_path):
    from dera_fast.train.tokenizer import TokenizerTrainConfig, TokenizerTrainer

    try:
        cfg = TokenizerTrainConfig.from_name("tiny", data="samples", ckpt_every=0, ckpt_minutes=0, num_workers=0,
                                             log_every=100)
        trainer = TokenizerTrainer(cfg, tmp_path, progress=False)
    except MissingDependencyError as e:
        pytest.skip(f"real sample clips unavailable: {e}")
    assert cfg.steps == STEPS and cfg.recipe == "fast" and cfg.vq_kmeans_init and cfg.vq_restart_after > 0
    x = _heldout(trainer.model.config, cfg.crop_scale)
    before = _measure(trainer.model, x)
    trainer.train()
    after = _measure(trainer.model, x)
    report = f"untrained {before}, trained {after}"
    assert after["codes"] >= 0.25, report
    assert after["std_ratio"] >= 0.5, report
    assert after["psnr"] >= before["psnr"] + 2.0, report
    # the training log shows the codebook's health
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in logged if "vq_used" in r][-1]
    assert last["step"] == STEPS and 0 < last["vq_used"] <= 1 and last["vq_perplexity"] > 1
