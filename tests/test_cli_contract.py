"""The CLI's exit-code contract, fuzzed: every bad invocation a user can make (bad numbers, bad `--set` values,
damaged or foreign model folders, outputs that are inputs or special files, a changed model on resume, tokens from
another tokenizer, ...) ends with one line on stderr and exit 2 (3 for a missing optional dependency), without a
traceback, and without creating or changing any file. Commands run in-process through ``dera_fast.cli.main``; a few
run as real subprocesses to check the process exit path."""
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dera_fast.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Models, token files, a video, a generator run and damaged copies, built through the library (fast)."""
    from dera_fast.data import SyntheticClips, write_video
    from dera_fast.models import DeRATokenizer, LARPTokenizer
    from dera_fast.train.generator import GeneratorTrainConfig, GeneratorTrainer
    from dera_fast.train.tokens import save_tokens, tokenizer_provenance

    d = tmp_path_factory.mktemp("contract")
    torch.manual_seed(0)
    tok = DeRATokenizer.from_name("tiny")
    tok.save_pretrained(d / "tok")
    other = LARPTokenizer.from_name("tiny")  # same token count and codebook, another tokenizer
    other.save_pretrained(d / "larp")
    ds = SyntheticClips(4, frames=8, size=32, seed=0)
    write_video(d / "clip.gif", torch.cat([ds[0]["video"], ds[1]["video"]], dim=1), fps=8)
    x = torch.stack([ds[i]["video"] for i in range(4)])
    save_tokens(d / "tokens.safetensors", tok.encode(x), codebook_size=64, labels=torch.tensor([0, 1, 0, 1]),
                meta=tokenizer_provenance(tok))
    save_tokens(d / "larp_tokens.safetensors", other.encode(x.clamp(0, 1)), codebook_size=64,
                labels=torch.tensor([0, 1, 0, 1]), meta=tokenizer_provenance(other))
    cfg = GeneratorTrainConfig.from_name("tiny", tokens=str(d / "tokens.safetensors"), steps=2, batch_size=2,
                                         log_every=1)
    GeneratorTrainer(cfg, d / "gen", device="cpu", progress=False).train()
    (d / "gen" / "train_config.json").write_text(json.dumps(cfg.to_dict()))
    for name, damage in DAMAGE.items():
        src = d / "tok"
        dst = d / f"tok_{name}"
        dst.mkdir()
        for f in src.iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
        damage(dst)
    (d / "pickle.safetensors").write_bytes(pickle.dumps({"tokens": [1, 2, 3]}))
    (d / "notes.txt").write_text("a plain file")
    (d / "list.json").write_text("[1, 2]")
    (d / "broken.json").write_text("{steps: 3")
    (d / "wrongtype.json").write_text(json.dumps({"batch_size": "8"}))
    (d / "out_exists.png").write_bytes(b"keep me")
    (d / "out_exists.safetensors").write_bytes(b"keep me")
    (d / "somedir").mkdir()
    (d / "nonempty").mkdir()
    (d / "nonempty" / "f").write_text("x")
    os.link(d / "clip.gif", d / "clip_hardlink.gif")
    os.mkfifo(d / "fifo.png")
    (d / "cwd").mkdir()
    return d


def _set_header(key, value):
    def damage(folder):
        header = json.loads((folder / "config.json").read_text())
        header[key] = value
        (folder / "config.json").write_text(json.dumps(header))
    return damage


def _set_config(key, value):
    def damage(folder):
        header = json.loads((folder / "config.json").read_text())
        if value is None:
            del header["config"][key]
        else:
            header["config"][key] = value
        (folder / "config.json").write_text(json.dumps(header))
    return damage


def _truncate(folder):
    w = folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 3])


DAMAGE = {
    "truncated": _truncate,
    "pickle": lambda f: (f / "model.safetensors").write_bytes(pickle.dumps({"w": torch.zeros(2)})),
    "newer": _set_header("format_version", 99),
    "wrongtype": _set_config("dim", "64"),
    "unknown": _set_config("dimension", 64),
    "negative": _set_config("codebook_size", -64),
    "list": lambda f: (f / "config.json").write_text("[]"),
    "noconfig": lambda f: (f / "config.json").write_text(json.dumps({"model_type": "dera", "format_version": 1})),
    "notjson": lambda f: (f / "config.json").write_text("{not json"),
    "modeltype": _set_header("model_type", "vqgan"),
    "noweights": lambda f: (f / "model.safetensors").unlink(),
}

T = "--model {tok}"
G = "--model {gen} --tokenizer {tok}"
CASES = [
    # info / unknown command
    "info --bogus", "frobnicate",
    # demo
    "demo --steps 0", "demo --gen-steps -1", "demo --out {d}/notes.txt", "demo --out {d}/nonempty",
    "demo --threads 0", "demo --out new_demo --teacher-image {d}/missing.safetensors",
    # train
    "train tokenizer --preset tiny --out new_run --set lr=abc", "train tokenizer --preset tiny --out r --set log_every=0",
    "train tokenizer --preset tiny --out r --set betas=[0.9]", "train tokenizer --preset tiny --out r --set steps=1.5",
    "train tokenizer --preset tiny --out r --set bogus=1", "train tokenizer --preset tiny --out r --set lr",
    "train tokenizer --preset tiny --out r --set ckpt_minutes=-1", "train tokenizer --preset tiny --out r --set epochs=-1",
    "train tokenizer --preset tiny --out r --set lr=Infinity", "train tokenizer --preset tiny --out r --set align=1",
    "train tokenizer --config {d}/list.json --out r", "train tokenizer --config {d}/broken.json --out r",
    "train tokenizer --config {d}/wrongtype.json --out r", "train tokenizer --config {d}/missing.json --out r",
    "train tokenizer --preset tiny --out r --steps 0", "train tokenizer --preset tiny --out r --batch-size -2",
    "train tokenizer --preset tiny --out r --threads -1", "train tokenizer --preset nope --out r",
    "train generator --preset tiny --tokens {d}/tokens.safetensors --out {d}/gen",
    "train generator --preset tiny --tokens {d}/tokens.safetensors --out {d}/notes.txt/run",
    "train generator --preset tiny --tokens {d}/pickle.safetensors --out r",
    "train generator --preset tiny --tokens {d}/missing.safetensors --out r",
    "train generator --preset tiny --tokens {d}/tokens.safetensors --out {d}/gen --resume --overwrite",
    "train generator --preset tiny --tokens {d}/tokens.safetensors --out {d}/gen --resume "
    "--set 'model_overrides={{\"dim\":32,\"n_head\":2}}' --steps 4",
    "train generator --preset tiny --tokens {d}/tokens.safetensors --out {d}/gen --resume --set ema_decay=0.9",
    "train generator --preset tiny --tokens {gen}/model.safetensors --out {d}/gen --overwrite",
    # tokenize
    "tokenize {d}/clip.gif {d}/clip.gif " + T, "tokenize {d}/clip.gif {d}/clip_hardlink.gif " + T,
    "tokenize {d}/clip.gif /dev/null " + T, "tokenize {d}/clip.gif {d}/fifo.png " + T,
    "tokenize {d}/clip.gif {d}/out_exists.safetensors " + T, "tokenize {d}/clip.gif {d}/somedir " + T,
    "tokenize {d}/clip.gif {d}/notes.txt/o.safetensors " + T, "tokenize {d}/clip.gif {tok}/model.safetensors " + T,
    "tokenize {d}/clip.gif o.safetensors --stride 0 " + T, "tokenize {d}/clip.gif o.safetensors --batch-size 0 " + T,
    "tokenize {d}/clip.gif o.safetensors --fps inf " + T, "tokenize {d}/clip.gif o.safetensors --fps nan " + T,
    "tokenize {d}/clip.gif o.safetensors --threads 0 " + T, "tokenize {d}/missing.gif o.safetensors " + T,
    "tokenize {d}/notes.txt o.safetensors " + T, "tokenize {d}/clip.gif o.safetensors --model {gen}",
    "tokenize {d}/clip.gif o.safetensors --model {d}/missing_model",
    "tokenize {d}/clip.gif /proc/o.safetensors " + T,
    *[f"tokenize {{d}}/clip.gif o.safetensors --model {{d}}/tok_{name}" for name in DAMAGE],
    # reconstruct
    "reconstruct {d}/clip.gif {d}/clip.gif " + T, "reconstruct {d}/clip.gif o.png --fps inf " + T,
    "reconstruct {d}/clip.gif o.png --fps 0 " + T, "reconstruct {d}/clip.gif o.png --batch-size -1 " + T,
    "reconstruct {d}/larp_tokens.safetensors o.png " + T, "reconstruct {d}/tokens.safetensors o.png --model {d}/larp",
    "reconstruct {d}/tokens.safetensors o.xyz " + T, "reconstruct {d}/tokens.safetensors o.png --metrics " + T,
    "reconstruct {d}/clip.gif {d}/out_exists.png " + T, "reconstruct {d}/pickle.safetensors o.png " + T,
    "reconstruct {d}/clip.gif {d}/fifo.png " + T, "reconstruct {d}/clip.gif {d}/somedir/ " + T,
    "reconstruct {d}/clip.gif o.png --model {d}/tok_truncated",
    # generate
    "generate o.png --class 0 --num -1 " + G, "generate o.png --class 0 --num 0 " + G,
    "generate o.png --class 0 --temperature 0 " + G, "generate o.png --class 0 --top-p 1.5 " + G,
    "generate o.png --class 0 --top-k -1 " + G, "generate o.png --class 0 --cfg nan " + G,
    "generate o.png --class 99 " + G, "generate o.png --class -1 " + G, "generate o.png --class 0 --fps 0 " + G,
    "generate o.png --class 0 --seed -1 " + G, "generate o.png --class 0 --model {tok} --tokenizer {tok}",
    "generate o.png --class 0 --model {gen} --tokenizer {gen}", "generate {gen}/config.json --class 0 " + G,
    "generate o.png --class 0 --model {gen} --tokenizer {d}/larp", "generate o.png --context {d}/clip.gif " + G,
    "generate {d}/out_exists.png --class 0 " + G, "generate o.png --class 0 --model {gen} --tokenizer {d}/tok_newer",
    # bench
    "bench --iters 0", "bench --batch 0", "bench --what everything", "bench --preset nope",
    "bench --json {d}/somedir", "bench --json {d}/out_exists.png", "bench --json {d}/notes.txt/b.json",
    "bench --threads -1",
    # newer commands
    "eval tokenizer --model {tok} --data {d}/missing --i3d {d}/missing.pt --out e.json",
    "eval tokenizer --model {tok} --data {d} --i3d {d}/missing.pt --out e.json --batch-size 0",
    "convert-teacher {d}/missing.pth o.safetensors", "convert-teacher {d}/pickle.safetensors {d}/pickle.safetensors",
    "prepare-data {d}/missing {d}/prepared", "prepare-data {d} {d}/prepared --size 0",
    "selftest --threads 0", "selftest --device gpu", "selftest --json {d}/somedir",
]


def _tree(d: Path) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(d):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(d))] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def _invoke(argv, capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse errors exit through SystemExit(2)
        rc = e.code
    return rc, capsys.readouterr().err


def _argv(case: str, d: Path) -> list[str]:
    import shlex

    return shlex.split(case.format(d=d, tok=d / "tok", gen=d / "gen" / "model"))


def test_enough_cases_across_all_commands():
    from dera_fast.cli import COMMANDS

    assert len(CASES) >= 60
    used = {c.split()[0].replace("-", "_") for c in CASES}
    assert set(COMMANDS) <= used, set(COMMANDS) - used


@pytest.mark.parametrize("case", CASES)
def test_bad_invocation_exits_2_without_traces(root, case, capsys, monkeypatch):
    monkeypatch.chdir(root / "cwd")
    monkeypatch.setenv("DERA_FAST_DEBUG", "0")
    before = _tree(root)
    no_bar = case.split()[0] not in ("info", "frobnicate", "eval", "convert-teacher", "selftest") and \
        "--bogus" not in case
    rc, err = _invoke(_argv(case, root) + (["--no-progress"] if no_bar else []), capsys)
    assert rc in (2, 3), (rc, err)
    assert "Traceback" not in err and err.strip(), err
    assert len(err.strip().splitlines()) == 1, err
    assert _tree(root) == before  # nothing created, changed or removed


def test_missing_optional_dependency_exits_3(root, capsys, monkeypatch):
    monkeypatch.chdir(root / "cwd")
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` fails as if PyAV were not installed
    before = _tree(root)
    rc, err = _invoke(_argv("reconstruct {d}/clip.gif o.mp4 --no-progress " + T, root), capsys)
    assert rc == 3 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert _tree(root) == before


def test_reconstruct_in_in_leaves_the_input_alone(root, capsys):
    data = (root / "clip.gif").read_bytes()
    rc, err = _invoke(_argv("reconstruct {d}/clip.gif {d}/clip.gif --overwrite --no-progress " + T, root), capsys)
    assert rc == 2 and "also an input" in err and (root / "clip.gif").read_bytes() == data


def test_token_provenance_override_and_overwrite(root, capsys, monkeypatch):
    monkeypatch.chdir(root / "cwd")
    out = root / "cwd" / "rec.png"
    case = "reconstruct {d}/larp_tokens.safetensors " + str(out) + " --no-progress " + T
    rc, err = _invoke(_argv(case, root), capsys)
    assert rc == 2 and "'larp' tokenizer" in err and "--ignore-provenance" in err
    assert main(_argv(case + " --ignore-provenance", root)) == 0 and out.stat().st_size > 0
    rc, err = _invoke(_argv(case + " --ignore-provenance", root), capsys)
    assert rc == 2 and "--overwrite" in err
    assert main(_argv(case + " --ignore-provenance --overwrite", root)) == 0
    out.unlink()


@pytest.mark.parametrize("argv", [
    "reconstruct {d}/clip.gif {d}/clip.gif " + T, "bench --iters 0",
    "tokenize {d}/clip.gif o.safetensors --model {d}/tok_pickle",
    "train tokenizer --preset tiny --out r --set lr=abc",
])
def test_real_process_exit_path(root, argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DERA_FAST_DEBUG": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    before = _tree(root)
    res = subprocess.run([sys.executable, "-m", "dera_fast", *_argv(argv, root)], capture_output=True, text=True,
                         env=env, cwd=root / "cwd", timeout=300)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert _tree(root) == before
    if argv.startswith("tokenize"):  # the debug switch shows the whole traceback
        res = subprocess.run([sys.executable, "-m", "dera_fast", *_argv(argv, root)], capture_output=True,
                             text=True, env={**env, "DERA_FAST_DEBUG": "1"}, cwd=root / "cwd", timeout=300)
        assert res.returncode == 1 and "Traceback" in res.stderr


def test_special_output_never_replaced(root, capsys):
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "cwd" / "sock.png"))
        try:
            rc, err = _invoke(_argv("reconstruct {d}/clip.gif {d}/cwd/sock.png --overwrite --no-progress " + T, root),
                              capsys)
            assert rc == 2 and "special file" in err
            assert (root / "cwd" / "sock.png").is_socket()
        finally:
            (root / "cwd" / "sock.png").unlink()

