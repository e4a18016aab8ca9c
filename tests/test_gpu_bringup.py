"""bench/gpu_bringup.sh --dry-run: the GPU bring-up flow on the CPU (CUDA steps skipped), so the script cannot rot
between the rare GPU sessions."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_dry_run_writes_the_report(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_bringup.sh"), "--dry-run", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["plot.png", "results.json", "table.md"]
    data = json.loads((out / "results.json").read_text())
    meta = data["meta"]
    assert meta["dry_run"] is True and meta["torch"] and "driver" in meta and "triton" in meta and "nvcc" in meta
    steps = {s["step"]: s["exit"] for s in data["steps"]}
    assert steps["build"] == "skipped" and steps["selftest"] == "0" and steps["tests"] == "0"
    assert {r["op"] for r in data["selftest"]} >= {"vq_nearest", "attention", "sacp_project"}
    assert all(r["status"] in ("pass", "skip") for r in data["selftest"])
    assert data["benchmarks"] and data["benchmarks"][0]["extra_info"]["variants"]
    assert "head-line ratios" in proc.stdout and "selftest:" in proc.stdout
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## selftest" in (out / "table.md").read_text()


def test_unknown_argument_is_a_usage_error():
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_bringup.sh"), "--bogus"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown argument" in proc.stderr
