"""Codes in use at dera-l scale (16x128x128 clips, d=768, 12+12 blocks, 1024 tokens, K=8192) on the real clips:
at initialisation and after a few training steps, with LARP's recipe and with codebook health on.

    python bench/recipe_dera_l.py                      # both variants, in parallel, ~30 min on 2 CPU cores
    python bench/recipe_dera_l.py --variants larp --steps 5 --batch 1    # a quick look

A CPU-sized stand-in for the real run: batch ``--batch`` (default 2), a constant learning rate (the variant's base
rate, without the 8-epoch warm-up that would keep it near zero for these few steps), reconstruction (the variant's
pixel loss) + vq_weight * VQ loss only (no GAN, AR prior or alignment), bf16 autocast where the CPU has AMX/AVX512-bf16
(the quantizer runs in fp32 either way). Measured on 8 held-out clips in eval mode (argmax codes): codes in use,
the unit latents' spread across clips relative to their overall spread, and PSNR. Writes
``bench/results/recipe/dera_l.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "recipe" / "dera_l.json"

# variant -> training recipe (dera_fast.train.tokenizer.RECIPES) whose optimiser, loss and codebook options it uses
VARIANTS = {"larp": "larp", "larp+codebook-health": "larp-vq"}


def run_variant(name: str, steps: int, batch: int, eval_clips: int, bf16: bool) -> dict:
    from recipe_common import evaluate, heldout_clips

    from dera_fast.data import SampleVideoClips
    from dera_fast.models import DeRATokenizer, TokenizerConfig
    from dera_fast.train.tokenizer import RECIPES

    torch.set_num_threads(1)
    torch.manual_seed(0)
    recipe = RECIPES[VARIANTS[name]]
    cfg = TokenizerConfig.from_name("dera-l", prior_depth=0)
    model = DeRATokenizer(cfg).train()
    model.quantizer.set_codebook_health(kmeans_init=recipe["vq_kmeans_init"], restart_after=recipe["vq_restart_after"],
                                        entropy_weight=recipe["vq_entropy_weight"])
    params = [p for n, p in model.named_parameters() if not n.startswith("align_head_")]
    opt = torch.optim.Adam(params, lr=recipe["lr"], betas=recipe["betas"])
    data = SampleVideoClips("train", cfg.num_frames, cfg.size, num_clips=steps * batch, value_range=cfg.pixel_range)
    x_eval = heldout_clips(cfg.num_frames, cfg.size, eval_clips, cfg.pixel_range)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    rec = {"variant": name, "recipe": VARIANTS[name], "lr": recipe["lr"], "betas": list(recipe["betas"]),
           "batch": batch, "bf16_autocast": bf16, "K": cfg.codebook_size, "tokens": cfg.num_tokens,
           "eval_clips": eval_clips, "curve": []}

    def measure(step, wall):
        with amp:
            e = evaluate(model, x_eval, batch=2)
        e.update(step=step, wall=round(wall, 1), codes_fraction=e["codes"] / cfg.codebook_size)
        rec["curve"].append(e)
        print(json.dumps(e), flush=True)

    wall = 0.0
    measure(0, wall)
    lo, hi = cfg.pixel_range
    for step in range(1, steps + 1):
        x = torch.stack([data[(step - 1) * batch + i]["video"] for i in range(batch)])
        t0 = time.perf_counter()
        with amp:
            recon, out = model(x)
        err = (recon.float() - x) / (hi - lo)  # on [0, 1] pixels, as the trainer
        loss = recipe["l1_weight"] * err.abs().mean() + recipe["mse_weight"] * err.pow(2).mean()
        loss = loss + 0.1 * out["loss_q"].float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        wall += time.perf_counter() - t0
        print(f"step {step}: loss {float(loss):.4f}, {wall:.0f} s, codes in batch "
              f"{model.quantizer.usage_stats()['vq_used'] * cfg.codebook_size:.0f}", flush=True)
        if step in (1, steps) or step % 10 == 0:
            measure(step, wall)
    rec["train_seconds"] = wall
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--eval-clips", type=int, default=8)
    ap.add_argument("--no-bf16", action="store_true", help="fp32 even where the CPU has bf16 matrix units")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    bf16 = not a.no_bf16 and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    out = Path(a.out)
    if a.one:
        rec = run_variant(a.one, a.steps, a.batch, a.eval_clips, bf16)
        out.with_name(f"dera_l--{a.one}.json").write_text(json.dumps(rec, indent=1))
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, "--one", v, "--steps", str(a.steps), "--batch", str(a.batch),
                               "--eval-clips", str(a.eval_clips), "--out", str(out)] + (["--no-bf16"] if a.no_bf16
                                                                                      else []), env=env, cwd=HERE)
             for v in a.variants]
    if any(p.wait() for p in procs):
        print("a variant failed", file=sys.stderr)
        return 1
    results = []
    for v in a.variants:
        part = out.with_name(f"dera_l--{v}.json")
        results.append(json.loads(part.read_text()))
        part.unlink()
    out.write_text(json.dumps(results, indent=1))
    print("| variant | codes in use: init / step 1 / step %d | latent spread: init / step %d |" % (a.steps, a.steps))
    print("|---|---|---|")
    for r in results:
        c = {e["step"]: e for e in r["curve"]}
        print(f"| {r['variant']} | {c[0]['codes']} / {c[1]['codes']} / {c[a.steps]['codes']} of {r['K']} | "
              f"{c[0]['spread_ratio']:.2f} / {c[a.steps]['spread_ratio']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
