"""CLI smoke tests on the tiny presets, and the exit codes for user mistakes (2) and missing extras (3)."""
import json
import sys

import pytest
import torch

from dera_fast.cli import main


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A trained (2-step) tiny tokenizer, a token file, a generator and two short videos, shared by the tests."""
    from dera_fast.data import SyntheticClips, write_video

    d = tmp_path_factory.mktemp("cli")
    ds = SyntheticClips(6, frames=8, size=32, seed=0)
    write_video(d / "clip.mp4", torch.cat([ds[0]["video"], ds[1]["video"]], dim=1), fps=8)  # 16 frames
    (d / "videos" / "a").mkdir(parents=True)
    (d / "videos" / "b").mkdir(parents=True)
    write_video(d / "videos" / "a" / "x.gif", ds[2]["video"], fps=8)
    write_video(d / "videos" / "b" / "y.gif", ds[3]["video"], fps=8)
    common = ["--no-progress", "--device", "cpu"]
    assert main(["train", "tokenizer", "--preset", "tiny", "--out", str(d / "tok"), "--steps", "2",
                 "--batch-size", "2", "--set", "num_clips=4", "--set", "gan_start=0", *common]) == 0
    assert main(["tokenize", str(d / "videos"), str(d / "tokens.safetensors"), "--model",
                 str(d / "tok" / "model"), *common]) == 0
    assert main(["train", "generator", "--preset", "tiny", "--tokens", str(d / "tokens.safetensors"),
                 "--out", str(d / "gen"), "--steps", "2", "--batch-size", "2", *common]) == 0
    return d


def test_train_outputs_and_resume(workdir, tmp_path):
    assert (workdir / "tok" / "model" / "config.json").is_file()
    assert (workdir / "tok" / "metrics.jsonl").is_file()
    assert json.loads((workdir / "tok" / "train_config.json").read_text())["steps"] == 2
    assert (workdir / "gen" / "model" / "model.safetensors").is_file()
    cfg = tmp_path / "gen.json"
    cfg.write_text(json.dumps({"tokens": str(workdir / "tokens.safetensors"), "batch_size": 2, "log_every": 1}))
    out = ["--out", str(workdir / "gen"), "--no-progress"]
    assert main(["train", "generator", "--config", str(cfg), "--steps", "3", "--resume", *out]) == 0
    steps = [json.loads(line)["step"] for line in (workdir / "gen" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 3]  # continued from the step-2 checkpoint, not from scratch


def test_tokenize_file_and_folder(workdir, capsys):
    from dera_fast.train.tokens import load_tokens

    ids, labels, meta = load_tokens(workdir / "tokens.safetensors")
    assert ids.shape == (2, 16) and labels.tolist() == [0, 1]
    assert json.loads(meta["classes"]) == ["a", "b"] and meta["clip_len"] == "8" and "tokenizer_config_hash" in meta
    out = workdir / "one.safetensors"
    assert main(["tokenize", str(workdir / "clip.mp4"), str(out), "--model", str(workdir / "tok" / "model"),
                 "--stride", "4", "--label", "3", "--no-progress"]) == 0
    ids, labels, meta = load_tokens(out)
    assert ids.shape == (3, 16) and labels.tolist() == [3, 3, 3] and meta["stride"] == "4"
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.get_slice("tokens").get_dtype() == "U16"


@pytest.mark.parametrize("src,extra", [("clip.mp4", ["--metrics", "--side-by-side"]), ("one.safetensors", [])])
def test_reconstruct(workdir, capsys, src, extra):
    if not (workdir / src).exists():
        pytest.skip("needs the token file of test_tokenize_file_and_folder")
    out = workdir / f"rec_{src}.gif"
    assert main(["reconstruct", str(workdir / src), str(out), "--model", str(workdir / "tok" / "model"),
                 "--no-progress", *extra]) == 0
    assert out.stat().st_size > 0
    if extra:
        assert "PSNR" in capsys.readouterr().out


def test_ignored_flags_are_named(workdir, tmp_path, caplog):
    """A flag the run cannot use is named in one warning line (with the reason), and the run goes on."""
    if not (workdir / "one.safetensors").exists():
        pytest.skip("needs the token file of test_tokenize_file_and_folder")
    tok = str(workdir / "tok" / "model")
    with caplog.at_level("WARNING", logger="dera_fast"):
        assert main(["reconstruct", str(workdir / "one.safetensors"), str(tmp_path / "r.png"), "--model", tok,
                     "--fps", "4", "--no-progress"]) == 0
    assert (tmp_path / "r.png").is_file()
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("warning: --fps ignored: a .png output") for m in lines), lines
    assert any("tokenized with stride 4, not the clip length 8: its clips overlap" in m for m in lines), lines
    caplog.clear()
    with caplog.at_level("WARNING", logger="dera_fast"):
        assert main(["tokenize", str(workdir / "videos"), str(tmp_path / "t.safetensors"), "--model", tok,
                     "--label", "3", "--no-progress"]) == 0
    assert [r.getMessage() for r in caplog.records] == [
        "warning: --label ignored: a folder's labels come from its class subfolders"]


def test_generate_and_bench(workdir, tmp_path, capsys):
    out = tmp_path / "gen.png"
    assert main(["generate", str(out), "--model", str(workdir / "gen" / "model"), "--tokenizer",
                 str(workdir / "tok" / "model"), "--class", "0", "1", "--num", "2", "--no-progress"]) == 0
    assert out.is_file()
    assert main(["bench", "--what", "tokenizer,generator", "--batch", "2", "--iters", "1",
                 "--json", str(tmp_path / "b.json")]) == 0
    rows = json.loads((tmp_path / "b.json").read_text())
    assert {r["what"] for r in rows} == {"encode", "decode", "generate"}
    assert main(["info"]) == 0


@pytest.mark.parametrize("argv,msg", [
    (["tokenize", "missing.mp4", "o.safetensors", "--model", "{tok}"], "input not found"),
    (["tokenize", "{dir}/clip.mp4", "o.safetensors", "--model", "{dir}"], "no config.json"),
    (["reconstruct", "{dir}/clip.mp4", "o.xyz", "--model", "{tok}"], "unsupported output type"),
    (["reconstruct", "{dir}/tok/metrics.jsonl", "o.mp4", "--model", "{tok}"], ""),
    (["train", "tokenizer", "--preset", "nope"], "unknown tokenizer training preset"),
    (["train", "tokenizer"], "exactly one of --config"),
    (["train", "tokenizer", "--config", "{dir}/nothere.json"], "config file not found"),
    (["train", "generator", "--preset", "tiny", "--set", "bogus=1"], "unknown generator training fields"),
    (["generate", "o.mp4", "--model", "{dir}/gen/model", "--tokenizer", "{tok}", "--class", "99"], "out of range"),
    (["generate", "o.mp4", "--model", "{dir}/gen/model", "--tokenizer", "{tok}", "--context", "{dir}/clip.mp4"],
     "class-conditional"),
    (["bench", "--what", "everything"], "unknown parts"),
])
def test_user_mistakes_exit_2(workdir, capsys, argv, msg):
    argv = [a.format(dir=workdir, tok=workdir / "tok" / "model") for a in argv]
    assert main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["tokenize"], ["train", "painter"], ["generate", "o.mp4", "--model", "m"],
                                  ["demo", "--steps", "many"], ["frobnicate"]])
def test_bad_arguments_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error:" in err


def test_missing_optional_dependency_exit_3(workdir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` fail like an absent package
    assert main(["reconstruct", str(workdir / "clip.mp4"), "o.mp4", "--model", str(workdir / "tok" / "model"),
                 "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "dera-fast[video]" in err and len(err.strip().splitlines()) == 1
