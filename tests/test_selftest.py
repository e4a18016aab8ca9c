"""``python -m dera_fast selftest``: covers the six ops, JSON records, exit codes, skips with reasons."""
import json
import os
import subprocess
import sys

import torch

from dera_fast import cli, selftest

OPS = {"vq_nearest", "vq_sample", "codebook_cross_entropy", "attention", "gradient_gram", "sacp_project"}


def _selftest(tmp_path, *args, **env):
    out = tmp_path / "selftest.json"
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0", **env}
    proc = subprocess.run([sys.executable, "-m", "dera_fast", "selftest", "--json", str(out), *args],
                          capture_output=True, text=True, env=full_env, timeout=600)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_cpu_selftest_passes_and_writes_records(tmp_path):
    proc, data = _selftest(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    records = data["records"]
    assert {r["op"] for r in records} == OPS
    assert {"dense causal fwd+bwd", "q_rows causal fwd+bwd", "varlen causal fwd+bwd"} <= {
        r["variant"] for r in records if r["op"] == "attention"}
    for r in records:
        assert {"op", "backend", "device", "status"} <= set(r) and r["status"] in ("pass", "skip"), r
        assert r["device"] == "cpu" and r["backend"] != "cuda"  # the C++ CPU kernels are "cpp"
        assert r["status"] == "pass" or r["reason"], r  # every skip says why
    assert all(r["status"] == "pass" for r in records if r["backend"] == "torch")
    assert any(r["backend"] == "triton" and "TRITON_INTERPRET" in r["reason"] for r in records)
    assert any(r["shape"].startswith("tiny") for r in records)  # real model shapes, not only awkward ones
    assert data["meta"]["devices"] == ["cpu"]
    assert "passed" in proc.stdout and "max err" in proc.stdout


def test_missing_extension_is_a_skip_with_reason(tmp_path):
    proc, data = _selftest(tmp_path, DERA_FAST_DISABLE_EXT="1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    cpp = [r for r in data["records"] if r["backend"] == "cpp"]
    assert cpp and all(r["status"] == "skip" and "extension is not loaded" in r["reason"] for r in cpp)


def test_bench_rows_have_times_and_ratios():
    case = next(c for c in selftest.cases("cpu") if c.op == "vq_nearest" and c.shape == "N257-K1031-D33")
    row = selftest.run_case(case, "torch", "cpu", bench=True)
    assert row.status == "pass" and row.ms > 0 and row.torch_ms == row.ms and row.speedup == 1.0
    table = selftest.format_table([row], bench=True)
    assert "speed-up" in table and "1.00x" in table


def test_failure_gives_exit_code_1(monkeypatch, capsys):
    def broken(backend, device):
        return 1.0, 1e-5, lambda: None  # an error far above the tolerance

    bad = selftest.Case("vq_nearest", "l2", "N1-K1-D1", torch.float32, 1.0, broken)
    monkeypatch.setattr(selftest, "cases", lambda device: iter([bad]))
    assert cli.main(["selftest", "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out and "FAIL vq_nearest" in captured.err


def test_crash_is_a_failed_row_not_a_crash():
    def crash(backend, device):
        raise RuntimeError("kernel exploded")

    row = selftest.run_case(selftest.Case("attention", "dense", "x", torch.float32, 1.0, crash), "torch", "cpu",
                            bench=False)
    assert row.status == "fail" and "kernel exploded" in row.reason


def test_cuda_without_gpu_is_a_usage_error(capsys):
    if torch.cuda.is_available():
        return
    assert cli.main(["selftest", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
