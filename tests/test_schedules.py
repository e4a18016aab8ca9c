"""Schedules and losses as LARP's code runs them: training length in epochs (steps derived from the data at run
time, scaling the cosine schedule and the prior's scheduled-sampling ramp), the effective LeCam weight, LPIPS'
linear heads from the lpips wheel, and teachers that are never silently random."""
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from dera_fast.cli import main
from dera_fast.train.losses import PerceptualLoss, build_perceptual, lpips_heads_file
from dera_fast.train.optim import schedule_mult
from dera_fast.train.schedule import apply_epochs
from dera_fast.train.tokenizer import TokenizerTrainConfig, TokenizerTrainer

COMMON = ["--no-progress", "--device", "cpu"]


# ------------------------------------------------------------------------------------------ epochs -> steps
@pytest.mark.parametrize("epochs, warmup, want", [(150, 8, (1500, 80)), (1.55, 0, (16, 5)), (0, 2, (7, 20)),
                                                  (0, 0, (7, 5))], ids=["larp-150-8", "fractional", "warmup-only",
                                                                        "off"])
def test_apply_epochs(epochs, warmup, want):
    cfg = SimpleNamespace(epochs=epochs, warmup_epochs=warmup, steps=7, warmup_steps=5, batch_size=4)
    info = apply_epochs(cfg, steps_per_epoch=10, num_clips=43)
    assert (cfg.steps, cfg.warmup_steps) == want
    assert bool(info) == (epochs > 0 or warmup > 0)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        apply_epochs(cfg, steps_per_epoch=0, num_clips=0)


def test_tokenizer_presets_use_epochs():
    larp, dera = TokenizerTrainConfig.from_name("larp-l"), TokenizerTrainConfig.from_name("dera-l")
    assert (larp.epochs, larp.warmup_epochs, larp.batch_size, larp.lr, larp.d_lr, larp.min_lr_mult) == \
        (150, 8, 128, 1e-4, 3e-5, 0.01)
    assert (dera.epochs, dera.warmup_epochs, dera.teacher_video_arch, dera.teacher_image_arch) == \
        (75, 8, "internvideo2-b14", "dinov3-b16")
    assert larp.lecam_weight == dera.lecam_weight == TokenizerTrainConfig().lecam_weight == 1e-6
    tiny = TokenizerTrainConfig.from_name("tiny")
    assert (tiny.epochs, tiny.steps, tiny.teachers) == (0, 1200, "random")


def test_tokenizer_steps_follow_the_data(tmp_path):
    """8 synthetic clips at batch 4 = 2 steps per epoch: 3 epochs = 6 steps, 1 warm-up epoch = 2 steps; the
    cosine schedule ends at its floor on the derived last step and the prior's ramp gets the derived total."""
    cfg = TokenizerTrainConfig.from_name("tiny", num_clips=8, batch_size=4, epochs=3, warmup_epochs=1, gan_weight=0)
    tr = TokenizerTrainer(cfg, tmp_path / "run", device="cpu", progress=False)
    assert (cfg.steps, cfg.warmup_steps) == (6, 2) and tr.schedule["steps_per_epoch"] == 2
    assert schedule_mult(2, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps) == 1.0
    assert schedule_mult(6, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps) == pytest.approx(0.01)
    seen = []
    forward = tr.model_ddp.forward
    tr.model_ddp.forward = lambda x, **kw: seen.append(kw["max_steps"]) or forward(x, **kw)
    tr.train_step(next(tr.stream))
    assert seen == [6]


# ------------------------------------------------------------------------------------------ teachers
def test_dera_l_without_teachers_exits_2(tmp_path, capsys):
    assert main(["train", "tokenizer", "--preset", "dera-l", "--out", str(tmp_path / "r"), *COMMON]) == 2
    err = capsys.readouterr().err
    assert "--teacher-image" in err and "--teacher-video" in err and "--teachers random" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_random_teachers_are_explicit_and_recorded(tmp_path, capsys):
    """--teachers random: the missing image teacher becomes a stand-in; a real (random-weight) InternVideo2 file
    serves as the video teacher; both choices land in train_config.json and every metrics record."""
    from test_internvideo2 import make_config, official_state

    torch.save({"model": official_state(make_config("D32-H2-L2-p8-t1-f4-s32-native"))}, tmp_path / "iv2.pth")
    args = ["train", "tokenizer", "--preset", "tiny", "--steps", "2", "--batch-size", "2", "--set", "num_clips=4",
            "--teacher-video", str(tmp_path / "iv2.pth"), "--set", 'teacher_video_arch="internvideo2-s14"', *COMMON]
    over = ["--set", "teacher_video_arch=internvideo2-b14"]
    # the tiny preset's stand-ins are opt-in too: teachers=files refuses the missing image teacher
    assert main([*args, "--out", str(tmp_path / "a"), "--teachers", "files"]) == 2
    assert "--teacher-image" in capsys.readouterr().err
    # a teacher file of another size than its preset: one-line error listing the mismatches
    assert main([*args, "--out", str(tmp_path / "b"), "--teachers", "random"]) == 2
    assert "shape mismatches" in capsys.readouterr().err
    iv2 = tmp_path / "iv2.safetensors"
    assert main(["convert-teacher", str(tmp_path / "iv2.pth"), str(iv2), "--arch", "internvideo2-b14",
                 *[x for kv in ("dim=32", "heads=2", "depth=2", "patch=8", "frames=4", "image_size=32",
                                "pos_frames=4", "pos_grid=4") for x in ("--set", kv)]]) == 0
    args[args.index(str(tmp_path / "iv2.pth"))] = str(iv2)
    assert main([*args, *over, "--out", str(tmp_path / "c"), "--teachers", "random"]) == 0
    saved = json.loads((tmp_path / "c" / "train_config.json").read_text())
    assert saved["teachers"] == "random" and saved["teacher_video"] == str(iv2)
    records = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r["teachers_random"] == 1 for r in records)


# ------------------------------------------------------------------------------------------ LPIPS heads
def test_lpips_heads_come_from_the_wheel(tmp_path, caplog):
    ref = PerceptualLoss("alex")
    torch.manual_seed(0)
    save_file({f"features.{k}": torch.randn_like(v) * 0.05 for k, v in ref.features.state_dict().items()},
              str(tmp_path / "alex.safetensors"))
    uniform = build_perceptual(str(tmp_path / "alex.safetensors"), "alex", "uniform")
    assert all(torch.allclose(h, torch.full_like(h, 1 / h.numel())) for h in uniform.heads)
    wheel = lpips_heads_file("alex")
    if wheel is None:
        with caplog.at_level("WARNING", logger="dera_fast.train"):
            build_perceptual(str(tmp_path / "alex.safetensors"), "alex")
        assert "UNIFORM" in caplog.text
        pytest.skip("lpips is not installed (pip install 'dera-fast[lpips]')")
    want = torch.load(wheel, map_location="cpu", weights_only=True)
    m = build_perceptual(str(tmp_path / "alex.safetensors"), "alex")
    for i, h in enumerate(m.heads):
        assert torch.equal(h, want[f"lin{i}.model.1.weight"].flatten())
    x, y = torch.rand(1, 3, 2, 64, 64), torch.rand(1, 3, 2, 64, 64)
    assert not torch.allclose(m(x, y), uniform(x, y))
