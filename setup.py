"""Build script for dera_fast.

What gets built is chosen by DERA_FAST_BUILD_EXT=auto|0|cpu|cuda:
  auto  the C++ CPU ops whenever torch is importable at build time (i.e. with --no-build-isolation),
        plus the CUDA kernels when torch is a CUDA build and nvcc is found;
  0     no extension (PyTorch + Triton paths only);
  cpu   the C++ CPU ops, error if torch is missing;
  cuda  C++ CPU ops + CUDA kernels, error if torch is not a CUDA build or nvcc is missing.
Honoured as well: TORCH_CUDA_ARCH_LIST (default 9.0a), MAX_JOBS, NVCC_THREADS, DEBUG=1.

The top-level kernels/ folder is installed as the subpackage dera_fast.kernels (package_dir), never as a
top-level `kernels` package (PyPI has an unrelated package of that name).
"""
import datetime
import json
import os
import shutil
import subprocess
import sys
from glob import glob

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"
MODE = os.environ.get("DERA_FAST_BUILD_EXT", "auto").strip().lower()
if MODE not in ("auto", "0", "cpu", "cuda"):
    sys.exit(f"DERA_FAST_BUILD_EXT={MODE!r}: expected one of auto, 0, cpu, cuda")

PACKAGES = sorted(set(find_packages(include=["dera_fast", "dera_fast.*"])) | {"dera_fast.kernels"})
PACKAGE_DIR = {"dera_fast": "dera_fast", "dera_fast.kernels": "kernels"}

try:  # only visible with --no-build-isolation
    import torch
except ImportError:
    torch = None


def _git_sha():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _find_cuda_home():
    # NOTE: the nvcc on PATH may be a shell wrapper (/usr/local/bin/nvcc -> exec the real one), so torch's
    # `which nvcc` guess of CUDA_HOME (= /usr/local) is wrong there; prefer explicit settings and /usr/local/cuda.
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def _decide():
    """Return (kind, reason) with kind in {"none", "cpu", "cuda"}."""
    if MODE == "0":
        return "none", "disabled by DERA_FAST_BUILD_EXT=0"
    if torch is None:
        if MODE in ("cpu", "cuda"):
            sys.exit(f"DERA_FAST_BUILD_EXT={MODE} needs torch at build time: "
                     "pip install --no-build-isolation -e .")
        return "none", "torch not importable at build time (use pip install --no-build-isolation -e .)"
    cuda_home = _find_cuda_home()
    if MODE == "cuda":
        if torch.version.cuda is None or cuda_home is None:
            sys.exit("DERA_FAST_BUILD_EXT=cuda needs a CUDA build of torch and nvcc (set CUDA_HOME); "
                     f"found torch {torch.__version__} (cuda={torch.version.cuda}), CUDA_HOME={cuda_home}")
        return "cuda", "DERA_FAST_BUILD_EXT=cuda"
    if MODE == "auto" and torch.version.cuda is not None and cuda_home is not None:
        return "cuda", "auto: CUDA torch and nvcc found"
    why = "cpu requested" if MODE == "cpu" else (
        "auto: torch is a CPU build" if torch.version.cuda is None else "auto: nvcc not found")
    return "cpu", why


KIND, REASON = _decide()
ARCH_LIST = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a") if KIND == "cuda" else None
DEBUG = os.environ.get("DEBUG", "0") == "1"

ext_modules = []
cxx_flags = ["-O0", "-g"] if DEBUG else ["-O3"]
cxx_flags += ["-std=c++20", "-fopenmp"]  # torch>=2.13 headers need C++20; nvcc 13 misparses ATen in C++17
nvcc_flags = []
if KIND != "none":
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    if KIND == "cuda":
        os.environ["CUDA_HOME"] = _find_cuda_home()
    srcs = ["csrc/ops.cpp"] + sorted(glob("csrc/*_cpu.cpp"))
    kw = dict(
        extra_link_args=["-fopenmp"],
        define_macros=[("Py_LIMITED_API", "0x030A0000")],
        py_limited_api=True,
        include_dirs=[os.path.join(HERE, "csrc")],
    )
    if KIND == "cuda":
        srcs += sorted(glob("csrc/*_cuda.cpp") + glob("csrc/*.cu"))
        nvcc_flags = (["-O0", "-G"] if DEBUG else ["-O3", "-lineinfo"]) + [
            "-std=c++20", "--expt-relaxed-constexpr", "--use_fast_math",
            "--threads", os.environ.get("NVCC_THREADS", "4")]
        kw["define_macros"] += [("DERA_FAST_WITH_CUDA", "1")]
        ext = CUDAExtension("dera_fast._C", srcs, extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, **kw)
    else:
        ext = CppExtension("dera_fast._C", srcs, extra_compile_args={"cxx": cxx_flags}, **kw)
    ext_modules = [ext]

# Record what the binary is built against; dera_fast._ext refuses a _C built for another torch minor.
# NOTE: the record is written into the build output only (next to the compiled _C: the package folder of an
# editable install, build_lib for a wheel), never into the source tree by a plain build: `pip wheel .` inside an
# editable checkout must not overwrite the editable install's record.
BUILD_INFO = {
    "version": VERSION,
    "git_sha": _git_sha(),
    "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "ext_kind": KIND,
    "ext_reason": REASON,
    "build_mode": MODE,
    "torch_version": getattr(torch, "__version__", None),
    "torch_cuda": getattr(getattr(torch, "version", None), "cuda", None),
    "cuda_arch_list": ARCH_LIST,
    "cxx_flags": cxx_flags,
    "nvcc_flags": nvcc_flags,
    "python": sys.version.split()[0],
}
BUILD_INFO_NAME = "_build_info.json"


def _write_build_info(package_dir: str) -> str:
    os.makedirs(package_dir, exist_ok=True)
    path = os.path.join(package_dir, BUILD_INFO_NAME)
    with open(path, "w") as f:
        json.dump(BUILD_INFO, f, indent=1)
    return path


class BuildPyWithInfo(build_py):
    """Wheels: the record goes into build_lib with the Python files (overwritten by build_ext when _C is built)."""

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):  # setuptools < 64 has no editable mode
            _write_build_info(os.path.join(self.build_lib, "dera_fast"))


cmdclass = {"build_py": BuildPyWithInfo}
if KIND != "none":
    class BuildExtWithInfo(BuildExtension):
        """The record goes next to the compiled extension, wherever build_ext puts it (in place or build_lib)."""

        def run(self):
            super().run()
            _write_build_info(os.path.dirname(self.get_ext_fullpath("dera_fast._C")))

    cmdclass["build_ext"] = BuildExtWithInfo

setup(
    version=VERSION,
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
