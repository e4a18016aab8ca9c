"""The demo tokenizer's numbers: the shipped checkpoint's pre-training curve, and a live run of the demo's length
from that checkpoint against one from random weights, both on the real clips' held-out split.

    # 1. the checkpoint (the one command; ~20-40 min on one CPU thread):
    python -m dera_fast train tokenizer --preset demo-pretrain --set keep_last=0 --out runs/demo-pretrain --threads 1
    # 2. held-out PSNR of each of its checkpoints:
    python bench/recipe_demo.py curve runs/demo-pretrain
    # 3. live fine-tuning vs from scratch, the same wall time each (1 thread):
    python bench/recipe_demo.py live runs/demo-pretrain/model --seconds 90

Held-out clips: 48 whole-frame crops (the demo preset's ``crop_scale``) of the last 30% of each sample video;
the 4x4 / 8x8 thumbnail baselines are measured on the same clips. Results go to ``bench/results/recipe/demo.json``
(merged per command) and ``demo.png``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from recipe_common import evaluate, heldout_clips, psnr, thumbnail, train_and_measure

OUT = Path(__file__).resolve().parent / "results" / "recipe"


def _merge(key: str, value) -> dict:
    path = OUT / "demo.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[key] = value
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return data


def curve(run: Path) -> dict:
    """Held-out PSNR / codes / spread of every checkpoint under ``run``/checkpoints."""
    from dera_fast.models import DeRATokenizer, TokenizerConfig
    from dera_fast.train import checkpoint as ckpt
    from dera_fast.train.tokenizer import TokenizerTrainConfig

    tcfg = TokenizerTrainConfig.from_dict(json.loads((run / "train_config.json").read_text()))
    mcfg = TokenizerConfig.from_name(tcfg.model, **tcfg.model_overrides)
    if tcfg.prior_weight <= 0:
        mcfg = mcfg.replace(prior_depth=0)
    x = heldout_clips(mcfg.num_frames, mcfg.size, 48, mcfg.pixel_range, scale=tuple(tcfg.crop_scale))
    points = []
    model = DeRATokenizer(mcfg)
    for where in ckpt.list_checkpoints(run):
        step, weights, _, _ = ckpt.load_checkpoint(where)
        model.load_state_dict(weights["model"])
        e = {"step": step, **evaluate(model, x)}
        points.append(e)
        print(json.dumps(e), flush=True)
    rec = {"run": str(run), "config": tcfg.to_dict(), "curve": points,
           "psnr_thumbnail_4x4": psnr(x, thumbnail(x, 4)), "psnr_thumbnail_8x8": psnr(x, thumbnail(x, 8))}
    _merge("pretrain", rec)
    return rec


def live(init: Path, seconds: float, threads: int) -> dict:
    torch.set_num_threads(threads)
    runs = {}
    for name, train in (("fine-tune", {"init_from": str(init)}), ("from-scratch", {})):
        runs[name] = train_and_measure(name, preset="demo", train=train, steps=10 ** 6, eval_steps=(0,),
                                       time_limit=seconds, eval_every_s=seconds / 6, aux=False,
                                       out_dir="/tmp/recipe_runs/demo")
    rec = {"seconds": seconds, "threads": threads, "init": str(init), "runs": runs}
    _merge("live", rec)
    return rec


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads((OUT / "demo.json").read_text())
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ref = None
    if "pretrain" in data:
        p = data["pretrain"]
        ref = p
        axes[0].plot([e["step"] for e in p["curve"]], [e["psnr"] for e in p["curve"]], marker=".",
                     label="demo-pretrain checkpoints")
        axes[0].set_xlabel("pre-training step (batch 16)")
    if "live" in data:
        for name, r in data["live"]["runs"].items():
            axes[1].plot([e["wall"] for e in r["curve"]], [e["psnr"] for e in r["curve"]], marker=".", label=name)
            ref = ref or r
        axes[1].set_xlabel(f"live training wall time (s, {data['live']['threads']} thread)")
    for ax in axes:
        if ref is not None:
            ax.axhline(ref["psnr_thumbnail_4x4"], color="k", ls="--", lw=1, label="4x4 thumbnail")
            ax.axhline(ref["psnr_thumbnail_8x8"], color="k", ls=":", lw=1, label="8x8 thumbnail")
        ax.set_ylabel("held-out PSNR (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("demo tokenizer on the real clips (held-out = last 30% of frames, whole-frame crops)")
    fig.tight_layout()
    fig.savefig(OUT / "demo.png", dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("curve")
    c.add_argument("run", type=Path)
    lv = sub.add_parser("live")
    lv.add_argument("init", type=Path)
    lv.add_argument("--seconds", type=float, default=90.0)
    lv.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    if a.cmd == "curve":
        curve(a.run)
    else:
        live(a.init, a.seconds, a.threads)
    plot()
    return 0


if __name__ == "__main__":
    sys.exit(main())
