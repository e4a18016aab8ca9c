"""Generator training from videos tokenized on the fly (LARP's AR trainers): frame prediction with LARP's context
padding, class-conditional with folder / CSV labels, epoch-based schedules, and the user mistakes."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from dera_fast.cli import main
from dera_fast.data import SyntheticClips, repeat_last_frame, write_video
from dera_fast.models import DeRATokenizer
from dera_fast.models.ar import ARGenerator
from dera_fast.train.generator import GeneratorTrainConfig, GeneratorTrainer

COMMON = ["--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Five 12-frame videos in three class folders, a LARP CSV over them, and an (untrained) tiny tokenizer."""
    d = tmp_path_factory.mktemp("gen")
    ds = SyntheticClips(5, frames=12, size=40, seed=0)
    rows = ["id,path,action,label"]
    for i, cls in enumerate(["run", "run", "jump", "jump", "swim"]):
        (d / "videos" / cls).mkdir(parents=True, exist_ok=True)
        write_video(d / "videos" / cls / f"v{i}.gif", ds[i]["video"], fps=8)
        rows.append(f"{i},videos/{cls}/v{i}.gif,{cls},0")
    (d / "train.csv").write_text("\n".join(rows) + "\n")
    torch.manual_seed(0)
    DeRATokenizer.from_name("tiny").save_pretrained(d / "tok")
    return d


def test_frame_prediction_trains_from_videos_through_the_cli(videos, tmp_path):
    out = tmp_path / "fp"
    assert main(["train", "generator", "--preset", "tiny", "--task", "frame-prediction", "--data",
                 str(videos / "videos"), "--tokenizer", str(videos / "tok"), "--out", str(out), "--steps", "3",
                 "--batch-size", "2", *COMMON]) == 0
    cfg = json.loads((out / "model" / "config.json").read_text())["config"]  # the shared checkpoint format
    assert cfg["frame_prediction"] is True and cfg["cls_token_num"] == 16 + 1 and cfg["vocab_size"] == 64
    gen = ARGenerator.from_pretrained(out / "model")
    tok = DeRATokenizer.from_pretrained(videos / "tok")
    clip = SyntheticClips(1, frames=8, size=32, seed=3)[0]["video"][None]
    ctx = tok.encode(repeat_last_frame(clip[:, :, :5], 8))
    res = gen.generate(context_ids=ctx, seed=0, progress=False)
    assert res.ids.shape == (1, 16)


def test_frame_prediction_batches_follow_larp(videos, tmp_path):
    """One batched encode of [clips ; context clips]; the context is frames 0..4 then frame 4 repeated
    (LARP's repeat_to_m_frames: no context frame is dropped); the loss is next-token CE given that context."""
    cfg = GeneratorTrainConfig.from_name("tiny", task="frame-prediction", data=str(videos / "videos"),
                                         tokenizer=str(videos / "tok"), steps=1, batch_size=2)
    tr = GeneratorTrainer(cfg, tmp_path / "run", device="cpu", progress=False)
    batch = next(tr.stream)
    x = batch["video"]
    assert x.shape == (2, 3, 8, 32, 32)  # random 8-frame windows of the 12-frame videos
    ids, ctx = tr._tokenize(x)
    padded = repeat_last_frame(x[:, :, :5], 8)
    assert torch.equal(padded[:, :, 4:], x[:, :, 4:5].expand(-1, -1, 4, -1, -1))
    tok = tr.tokenizer
    assert not tok.training and not any(p.requires_grad for p in tok.parameters())
    assert torch.equal(ids, tok.encode(x)) and torch.equal(ctx, tok.encode(padded))
    with torch.no_grad():
        tr.model.head.weight.normal_(std=0.5)  # non-uniform logits (the head is zero-initialised)
    before = copy.deepcopy(tr.model)
    torch.manual_seed(1)
    logs = tr.train_step(batch)
    torch.manual_seed(1)  # the same dropout draws
    with torch.no_grad():
        want = F.cross_entropy(before(ids[:, :-1], context_ids=ctx).flatten(0, 1), ids.flatten())
    assert math.isclose(logs["loss"], float(want), rel_tol=1e-5) and abs(logs["loss"] - math.log(64)) > 1e-2


def test_class_task_labels_from_folders_and_csv(videos, tmp_path):
    for source in (videos / "videos", videos / "train.csv"):
        out = tmp_path / source.stem
        assert main(["train", "generator", "--preset", "tiny", "--data", str(source), "--tokenizer",
                     str(videos / "tok"), "--out", str(out), "--steps", "2", "--batch-size", "2", *COMMON]) == 0
        cfg = json.loads((out / "model" / "config.json").read_text())["config"]  # the shared checkpoint format
        assert cfg["frame_prediction"] is False and cfg["num_classes"] == 3
        assert json.loads((out / "model" / "classes.json").read_text()) == ["jump", "run", "swim"]


def test_epochs_derive_steps_at_run_time(videos, tmp_path):
    """5 videos at batch 2: 2 steps per epoch (ragged tail dropped, as LARP's drop_last loader)."""
    out = tmp_path / "ep"
    assert main(["train", "generator", "--preset", "tiny", "--data", str(videos / "videos"), "--tokenizer",
                 str(videos / "tok"), "--out", str(out), "--epochs", "1.5", "--batch-size", "2",
                 "--set", "warmup_epochs=1", *COMMON]) == 0
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["steps"], saved["warmup_steps"]) == (3, 2)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["schedule_steps_per_epoch"] == 2 and first["schedule_steps"] == 3


def test_larp_generator_presets():
    ucf, fp = GeneratorTrainConfig.from_name("ucf-lp"), GeneratorTrainConfig.from_name("k600-fp-lp")
    assert (ucf.model, ucf.epochs, ucf.warmup_epochs, ucf.batch_size, ucf.lr, ucf.weight_decay) == \
        ("LP", 3000, 4, 64, 6e-4, 0.05)
    assert (fp.task, fp.model, fp.epochs, fp.warmup_epochs) == ("frame-prediction", "LP", 75, 1)
    assert GeneratorTrainConfig.from_name("dera-ucf").model == GeneratorTrainConfig.from_name("dera-k600-fp").model \
        == "L"


@pytest.mark.parametrize("argv, msg", [
    (["--task", "frame-prediction", "--tokens", "{d}/none.safetensors"], "tokenized on the fly"),
    (["--data", "{d}/videos"], "give the tokenizer"),
    (["--data", "{d}/videos", "--tokenizer", "{d}/videos"], "tokenizer"),
    (["--task", "frame-prediction", "--data", "{d}/videos", "--tokenizer", "{d}/tok", "--set", "context_frames=8"],
     "context_frames"),
    (["--teacher-image", "x.safetensors"], "train tokenizer"),
])
def test_generator_mistakes_exit_2(videos, capsys, argv, msg):
    argv = [a.format(d=videos) for a in argv]
    assert main(["train", "generator", "--preset", "tiny", "--steps", "1", "--out", str(videos / "bad"), *argv,
                 *COMMON]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
