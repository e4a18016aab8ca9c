"""CPU checks of the attention CUDA backend (csrc/attention_kernels*.cu*, attention_kernels.h).

No GPU is needed: both tests build host programs (tests/cuda_emu/attention_helpers.cpp, attention_emulated.cpp) with
the C++ compiler and the CUDA headers (for the types).

test_attention_index_helpers checks the inline index arithmetic of attention_kernels.h exhaustively:
  * is_visible / visible_keys agree (the visible keys of a row are a prefix);
  * fwd_key_tiles: over all splits, every key tile holding a visible key of the query tile is visited exactly
    once and no other tile is, for ragged lengths, causal offsets of both signs and several tile sizes;
  * bwd_first_q_tile: the dK/dV kernels skip exactly the query tiles with no visible (query, key) pair;
  * seq_info / row_index in dense and varlen mode (rows of all sequences and heads map one-to-one onto [0, H*T));
  * choose_num_splits stays within [1, kMaxSplits] and one wave of SMs.

test_attention_kernels_emulated runs the real kernels and launchers (forward, split-KV combine, backward) on the
CPU: the CUDA sources are compiled unchanged by the host compiler, with tests/cuda_emu/ first on the include path,
so that its CPU versions of the two hardware headers (<attention_ptx.cuh>: the PTX wrappers; <attention_launch.cuh>:
the launch helper and dynamic shared memory) replace csrc/'s; no source is copied or edited. A CTA is 128 fibers;
__syncthreads, warp shuffles, ldmatrix (x4, .trans) and mma.sync.m16n8k16 are emulated from their PTX ISA
definitions (fragment layouts written independently of the kernels); the scheduler lets warps drift apart at
random so that a missing barrier shows up; unwritten shared memory reads as NaN. What it cannot check: the inline
PTX strings themselves, cp.async timing (copies complete at once), and anything about speed. The kernels are
compared with a float64 reference (out, lse, dq, dk, dv) on fp16, bf16 and fp32, every head dim, dense, varlen
(with an empty sequence), causal offsets of both signs (fully masked rows), and split-KV; and NaN propagation: a
NaN query row gives NaN out and lse (not the empty-row 0 / -inf), with and without split-KV.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
EMU = Path(__file__).resolve().parent / "cuda_emu"


def _cuda_include():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_runtime.h").exists():
            return Path(home) / "include"
    return None


def _build(src: Path, exe: Path, *includes: Path, warn: tuple = ("-Wall", "-Wextra", "-Werror")) -> Path:
    """Compile ``src``; ``includes`` come first on the include path, then csrc/, then the CUDA headers."""
    cxx = shutil.which("g++") or shutil.which("c++")
    inc = _cuda_include()
    if cxx is None or inc is None:
        pytest.skip("needs a host C++ compiler and the CUDA runtime headers (cuda_runtime.h)")
    cmd = [cxx, "-std=c++20", "-O1", *warn, *(f"-I{d}" for d in includes), f"-I{CSRC}", f"-I{inc}", str(src),
           "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    return exe


def _run(exe: Path, timeout: int) -> None:
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert res.stdout.strip().endswith("0 failures"), res.stdout


def test_attention_index_helpers(tmp_path):
    _run(_build(EMU / "attention_helpers.cpp", tmp_path / "helpers"), timeout=120)


def test_emulation_headers_mirror_the_real_ones():
    """The emulator swaps exactly the two hardware headers, which the kernels reach through the include path."""
    common = (CSRC / "attention_kernels_common.cuh").read_text()
    for name in ("attention_ptx.cuh", "attention_launch.cuh"):
        assert (CSRC / name).is_file() and (EMU / name).is_file()
        assert f"#include <{name}>" in common  # angle brackets: resolved through -I, never next to the includer


@pytest.mark.slow
def test_attention_kernels_emulated(tmp_path):
    exe = _build(EMU / "attention_emulated.cpp", tmp_path / "emu", EMU, warn=("-Wno-unknown-pragmas",))
    _run(exe, timeout=600)
