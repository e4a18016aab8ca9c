"""Compile checks of the CUDA sources, runnable on a machine without a GPU.

* every ``csrc/*.cu`` is compiled with ``nvcc -c`` for sm_90a, with setup.py's ``--expt-relaxed-constexpr``;
  ``--ptxas-options=-v`` gives the per-kernel register, shared-memory and spill report, part of the failure
  message and printed (``pytest -rP`` or ``-s`` shows it);
* every glue file (``csrc/*_cuda.cpp``, ``csrc/*_cpu.cpp``, ``csrc/ops.cpp``) is syntax-checked with ``g++`` against
  torch's headers, the way setup.py compiles it.

Files are discovered by glob, so a new op's sources are covered automatically. The whole module skips only when
nvcc is absent.

NOTE on CPU-only torch wheels: they ship the c10/cuda headers but not the build-generated
``c10/cuda/impl/cuda_cmake_macros.h``; torch's own ``C10_CUDA_NO_CMAKE_CONFIGURE_FILE`` switch skips that include
(it only defines the Windows DLL-export macro), so the glue is still checked against the real c10/cuda API.
``ATen/cuda/CUDAContext.h`` additionally needs the cuBLAS / cuSPARSE / cuSOLVER headers: a glue file that includes
it is skipped, with that reason, only when the toolkit lacks them (glue should prefer c10/cuda/CUDAStream.h).
"""
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
ARCH = "-gencode=arch=compute_90a,code=sm_90a"
SETUP_NVCC_FLAGS = ["--expt-relaxed-constexpr"]  # passed by setup.py too: sources may rely on it
CU_FILES = sorted(CSRC.glob("*.cu"))
GLUE_FILES = sorted(set(CSRC.glob("*_cuda.cpp")) | set(CSRC.glob("*_cpu.cpp")) | {CSRC / "ops.cpp"})
CONTEXT_LIBS = ("cublas_v2.h", "cublasLt.h", "cusparse.h", "cusolverDn.h")  # needed by ATen/cuda/CUDAContext.h


def _find_nvcc():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = _find_nvcc()
# the nvcc on PATH may be a wrapper script: the toolkit is where the real binary lives
CUDA_HOME = str(Path(os.path.realpath(NVCC)).parents[1]) if NVCC else None
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME, /usr/local/cuda/bin, PATH)")


def _run(cmd):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    return proc.returncode, proc.stdout + proc.stderr


def _ptxas_summary(log):
    """One line per kernel: name, registers, shared memory and spills."""
    lines, name, spills = [], None, ""
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)'", line):
            name, spills = m.group(1), ""
        elif (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)) and name:
            spills = f"spill stores {m.group(1)} B, spill loads {m.group(2)} B"
        elif (m := re.search(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?", line)) and name:
            lines.append(f"{name}: {m.group(1)} registers, {m.group(2) or 0} B smem, {spills}")
            name = None
    text = "\n".join(lines)
    if shutil.which("c++filt"):  # readable kernel names
        text = subprocess.run(["c++filt"], input=text, capture_output=True, text=True).stdout
    return text


@pytest.mark.parametrize("src", CU_FILES, ids=[p.name for p in CU_FILES])
def test_nvcc_compiles(src, tmp_path):
    cmd = [NVCC, "-std=c++20", "-c", str(src), "-o", str(tmp_path / "out.o"), ARCH, "-Xcompiler", "-fPIC",
           "-I", str(CSRC), "--ptxas-options=-v", *SETUP_NVCC_FLAGS]
    rc, log = _run(cmd)
    summary = _ptxas_summary(log)
    print(summary)
    assert rc == 0, f"nvcc failed on {src.name}:\n{' '.join(cmd)}\n{log[-6000:]}\nptxas summary:\n{summary}"


def _glue_flags():
    torch_inc = [Path(p) for p in torch.utils.cpp_extension.include_paths()]
    flags = ["-std=c++20", "-fsyntax-only", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             "-DPy_LIMITED_API=0x030A0000", "-I", str(CSRC)]
    for inc in [*torch_inc, Path(sysconfig.get_paths()["include"]), Path(CUDA_HOME) / "include"]:
        flags += ["-I", str(inc)]
    if not any((p / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in torch_inc):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")  # CPU wheel: see the module docstring
    return flags


@pytest.mark.parametrize("src", GLUE_FILES, ids=[p.name for p in GLUE_FILES])
def test_glue_syntax(src):
    missing = [h for h in CONTEXT_LIBS if not (Path(CUDA_HOME) / "include" / h).exists()]
    if re.search(r'#include\s*[<"]ATen/cuda/CUDAContext', src.read_text()) and missing:
        pytest.skip(f"{src.name} includes ATen/cuda/CUDAContext.h, which needs {missing}, absent from {CUDA_HOME}")
    cmd = ["g++", *_glue_flags(), str(src)]
    rc, log = _run(cmd)
    assert rc == 0, f"g++ -fsyntax-only failed on {src.name}:\n{' '.join(cmd)}\n{log[-6000:]}"
