"""A SIGKILL while a checkpoint or the model/ export is being written, then ``--resume``: the run continues from the
newest intact checkpoint and ends bit-identical to an uninterrupted run, with each step once in metrics.jsonl, also
when the newest checkpoint was damaged after the kill. ``DERA_FAST_TEST_SLOW_WRITE`` makes the writer sleep inside
the chosen write (after its data is written, before it is published), so the kill lands there every time."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DERA_FAST_DEBUG": "0",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
COMMON = ["--steps", "6", "--set", "ckpt_every=2", "--set", "log_every=1", "--set", "keep_last=0", "--device", "cpu",
          "--threads", "1", "--no-progress"]


def _cmd(what: str, out: Path, tokens: Path) -> list[str]:
    extra = (["--tokens", str(tokens), "--batch-size", "4"] if what == "generator" else
             ["--batch-size", "2", "--set", "num_clips=4", "--set", "gan_start=0", "--set", "d_update_every=2"])
    return [sys.executable, "-m", "dera_fast", "train", what, "--preset", "tiny", "--out", str(out), *extra, *COMMON]


def _run(cmd, **env) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, env={**ENV, **env}, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _kill_when(cmd, ready, slow: str) -> None:
    """Start ``cmd`` with writes matching ``slow`` sleeping 30 s; SIGKILL it once ``ready()`` holds."""
    proc = subprocess.Popen(cmd, env={**ENV, "DERA_FAST_TEST_SLOW_WRITE": slow}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    try:
        while not ready():
            assert proc.poll() is None, f"finished before the kill: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "the write to kill never started"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _temps(folder: Path, stem: str) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(f".{stem}.tmp")] if folder.is_dir() else []


def _same_run(a: Path, b: Path) -> None:
    """Bit-identical final weights and optimiser state, and each step once in the log."""
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa = load_file(a / "checkpoints" / "step_00000006" / "state.safetensors")
    sb = load_file(b / "checkpoints" / "step_00000006" / "state.safetensors")
    # NumPy's global generator starts OS-seeded in each process and training never draws from it: skip its key
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if ".numpy." not in k)
    assert any(".torch" in k for k in sa)  # the torch generator state is compared
    steps = [json.loads(line)["step"] for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    la = [json.loads(line)["loss"] for line in (a / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(line)["loss"] for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert la == lb


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A token file and the uninterrupted reference runs."""
    from dera_fast.train.tokens import save_tokens

    d = tmp_path_factory.mktemp("kill")
    torch.manual_seed(0)
    save_tokens(d / "tokens.safetensors", torch.randint(0, 64, (16, 16)), codebook_size=64,
                labels=torch.arange(16) % 2)
    for what in ("generator", "tokenizer"):
        _run(_cmd(what, d / f"ref_{what}", d / "tokens.safetensors"))
    return d


@pytest.mark.slow
@pytest.mark.parametrize("what", ["generator", "tokenizer"])
def test_kill_during_checkpoint_then_resume(runs, tmp_path, what):
    out = tmp_path / "run"
    cmd = _cmd(what, out, runs / "tokens.safetensors")
    _kill_when(cmd, lambda: bool(_temps(out / "checkpoints", "step_00000004")), slow="30:step_00000004")
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) == ["LATEST", "step_00000002"]
    assert _temps(ckpts, "step_00000004")  # the half-published checkpoint is only a temporary
    res = _run(cmd + ["--resume"])
    assert "resumed from" in res.stderr and "step_00000002" in res.stderr
    assert not _temps(ckpts, "step_00000004")  # cleaned at the next start
    _same_run(runs / f"ref_{what}", out)


@pytest.mark.slow
def test_kill_during_export_then_damaged_newest(runs, tmp_path):
    from dera_fast.models.ar import ARGenerator

    out = tmp_path / "run"
    cmd = _cmd("generator", out, runs / "tokens.safetensors")
    step4 = out / "checkpoints" / "step_00000004"
    _kill_when(cmd, lambda: step4.is_dir() and bool(_temps(out, "model")), slow=f"30:{out / 'model'}")
    assert _temps(out, "model")
    ARGenerator.from_pretrained(out / "model")  # the previous export (step 2) is intact and loads
    w = step4 / "model.safetensors"  # damage the newest checkpoint after the kill
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    res = _run(cmd + ["--resume"])
    assert "step_00000004" in res.stderr and "damaged" in res.stderr and "resumed from" in res.stderr \
        and "step_00000002" in res.stderr
    assert (out / "checkpoints" / "step_00000004.damaged").is_dir() and not _temps(out, "model")
    _same_run(runs / "ref_generator", out)
