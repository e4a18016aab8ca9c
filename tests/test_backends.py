"""Backend selection policy, extension loading and fallback, packaging layout, `python -m dera_fast info`."""
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import require

import dera_fast
from dera_fast import backends
from dera_fast.backends import BackendUnavailableError, pick, use_backend

IMPLS = {"torch": lambda: "torch", "triton": lambda: "triton", "cuda": lambda: "cuda", "cpp": lambda: "cpp"}
REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def test_explicit_argument_wins_over_context():
    x = torch.zeros(1)
    with use_backend("triton" if "triton" in backends.available("cpu") else "torch"):
        assert pick("op", IMPLS, x, "torch")[0] == "torch"


def test_use_backend_nests_and_restores():
    x = torch.zeros(1)
    before = pick("op", {"torch": IMPLS["torch"]}, x)[0]
    with use_backend("torch"):
        assert pick("op", IMPLS, x)[0] == "torch"
        with use_backend("auto"):
            assert pick("op", {"torch": IMPLS["torch"]}, x)[0] == before
        assert pick("op", IMPLS, x)[0] == "torch"


def test_auto_prefers_extension_then_triton_then_torch():
    x = torch.zeros(1)
    name, _ = pick("vq_nearest", IMPLS, x)
    if "cpu" in backends.EXT_OPS.get("dera_fast_C::vq_nearest", ()):
        assert name == "cpp"  # the extension's C++ CPU kernel
    # an op without an extension kernel for this device skips to the next backend; on CPU tensors that is torch:
    # automatic selection never runs the Triton interpreter, even under TRITON_INTERPRET=1
    name, _ = pick("vq_sample", IMPLS, x)
    assert name == "torch"
    if "triton" in backends.available("cpu"):
        assert pick("vq_sample", IMPLS, x, "triton")[0] == "triton"
        with use_backend("triton"):
            assert pick("vq_sample", IMPLS, x)[0] == "triton"


def test_supports_predicate_skips_backend_in_auto_mode():
    name, _ = pick("op", {"torch": IMPLS["torch"], "triton": IMPLS["triton"]}, torch.zeros(1),
                   supports={"triton": lambda: False})
    assert name == "torch"


def test_explicit_missing_backend_raises_with_what_is_available():
    x = torch.zeros(1)
    with pytest.raises(BackendUnavailableError, match="Usable here"):
        pick("vq_sample", IMPLS, x, "cpp")  # no C++ CPU kernel for vq_sample
    with pytest.raises(BackendUnavailableError, match="has no 'triton' backend"):
        pick("op", {"torch": IMPLS["torch"]}, x, "triton")
    with pytest.raises(ValueError, match="backend"):
        pick("op", IMPLS, x, "tpu")
    with pytest.raises(ValueError, match="use_backend"):
        with use_backend("gpu"):
            pass


def test_triton_not_chosen_for_cpu_tensors_without_interpreter():
    code = ("import torch, dera_fast\n"
            "from dera_fast.backends import pick, BackendUnavailableError\n"
            "impl = {'torch': 1, 'triton': 2}\n"
            "print(pick('op', impl, torch.zeros(1))[0])\n"
            "try:\n    pick('op', impl, torch.zeros(1), 'triton')\nexcept BackendUnavailableError as e:\n"
            "    print('raised', 'TRITON_INTERPRET' in str(e))\n")
    out = _run(code, TRITON_INTERPRET="0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["torch", "raised", "True"]


def test_env_variable_selects_backend():
    code = "import torch, dera_fast\nprint(dera_fast.backends.pick('op', {'torch': 1, 'cuda': 2}, torch.zeros(1))[0])"
    out = _run(code, DERA_FAST_BACKEND="torch")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch"
    out = _run(code, DERA_FAST_BACKEND="bogus")
    assert out.returncode != 0 and "DERA_FAST_BACKEND" in out.stderr


def test_info_and_cli():
    info = backends.info()
    for key in ("torch", "triton", "extension_loaded", "build", "backends_cpu", "extension_ops"):
        assert key in info
    assert "torch" in info["backends_cpu"]
    out = subprocess.run([sys.executable, "-m", "dera_fast", "info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "torch" in out.stdout and "backends (cpu)" in out.stdout
    out = subprocess.run([sys.executable, "-m", "dera_fast", "info", "--json"], capture_output=True, text=True,
                         timeout=300)
    assert json.loads(out.stdout)["torch"] == torch.__version__


def test_kernels_installed_as_subpackage_only(tmp_path):
    spec = importlib.util.find_spec("dera_fast.kernels")
    assert spec is not None and pathlib.Path(spec.origin).parent == REPO / "kernels"
    assert not (REPO / "dera_fast" / "kernels").exists()
    # from outside the checkout (the repo root itself is on sys.path only because it is the cwd here),
    # the installed package must not expose a top-level `kernels`
    code = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert str(REPO / "kernels") not in out.stdout


def _copy_package(tmp_path) -> pathlib.Path:
    """A standalone copy of the installed package (with its built _C, if any) to tamper with."""
    dst = tmp_path / "site" / "dera_fast"
    shutil.copytree(pathlib.Path(dera_fast.__file__).parent, dst, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "kernels", dst / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    return dst


# NOTE: an editable install's meta-path finder would resolve dera_fast._C to the source tree's copy; drop it so the
# tampered package copy is what gets imported.
_PROBE = ("import sys\nsys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
          "import warnings\nwarnings.simplefilter('always')\n"
          "with warnings.catch_warnings(record=True) as w:\n    import dera_fast, torch\n"
          "msgs = [str(x.message) for x in w if x.category.__name__ == 'ExtensionWarning']\n"
          "print(len(msgs)); print(msgs[0] if msgs else '')\n"
          "print(dera_fast.backends.HAS_EXT)\n"
          "print(dera_fast.ops.vq_nearest(torch.randn(4, 8), torch.randn(5, 8)).shape[0])\n")


def _probe(site):
    env = {k: v for k, v in os.environ.items() if k != "DERA_FAST_DISABLE_EXT"}
    env["PYTHONPATH"] = str(site)
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=300,
                         cwd=site)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


@pytest.mark.skipif(not backends.HAS_EXT, reason="needs a built extension to tamper with")
def test_stale_extension_warns_once_and_falls_back(tmp_path):
    pkg = _copy_package(tmp_path)
    info = (pkg / "_build_info.json").read_text()
    (pkg / "_build_info.json").write_text(info.replace(json.dumps(torch.__version__), json.dumps("1.13.0")))
    lines = _probe(pkg.parent)
    assert lines[0] == "1" and "stale" in lines[1] and "pip install --no-build-isolation" in lines[1]
    assert lines[2:] == ["False", "4"]


@pytest.mark.skipif(not backends.HAS_EXT, reason="needs a built extension to tamper with")
def test_broken_extension_warns_once_and_falls_back(tmp_path):
    pkg = _copy_package(tmp_path)
    for so in pkg.glob("_C*.so"):
        so.write_bytes(b"not an ELF file")
    lines = _probe(pkg.parent)
    assert lines[0] == "1" and "failed to load" in lines[1]
    assert lines[2:] == ["False", "4"]


def test_missing_extension_warns_once_and_falls_back(tmp_path):
    pkg = _copy_package(tmp_path)
    for so in pkg.glob("_C*.so"):
        so.unlink()
    lines = _probe(pkg.parent)
    assert lines[0] == "1" and "rebuild" in lines[1].lower()
    assert lines[2:] == ["False", "4"]


# ---- names: a backend name says what runs ----

def test_names_say_what_runs():
    assert backends.BACKENDS == ("cuda", "triton", "cpp", "torch")
    assert "cuda" not in backends.available("cpu")  # the C++ CPU kernels are "cpp", never "cuda"
    assert "cpp" not in backends.available("cuda")
    if backends.EXT_OPS.get("dera_fast_C::vq_nearest", frozenset()) & {"cpu"}:
        assert "cpp" in backends.available("cpu")
    assert backends.why_unavailable("torch", "attention", "cpu") is None
    assert "CUDA kernels" in backends.why_unavailable("cuda", "vq_nearest", "cpu")
    assert "C++ CPU kernels" in backends.why_unavailable("cpp", "vq_nearest", "cuda")
    if backends.HAS_EXT:
        assert "no cpu kernel for attention" in backends.why_unavailable("cpp", "attention", "cpu")
    with pytest.raises(ValueError, match="backend"):
        backends.why_unavailable("gpu")


def test_error_lists_only_backends_that_can_run():
    import dera_fast.ops as ops

    assert dera_fast.BackendUnavailableError is ops.BackendUnavailableError is BackendUnavailableError
    z, cb = torch.randn(3, 300), torch.randn(4, 300)  # D = 300: beyond the Triton kernels' D <= 256
    with pytest.raises(BackendUnavailableError) as err:
        ops.vq_nearest(z, cb, backend="cuda")
    usable = [b for b in backends.BACKENDS if f"'{b}'" in str(err.value).split("Usable here:")[1]]
    expect = ["cpp", "torch"] if backends.why_unavailable("cpp", "vq_nearest", "cpu") is None else ["torch"]
    assert usable == expect, str(err.value)
    with pytest.raises(BackendUnavailableError, match=r"Usable here: \['torch'\]"):
        ops.vq_sample(torch.randn(3, 300), torch.randn(4, 300), temperature=0.1, backend="cpp")


def test_auto_rules_decide_per_shape_class(monkeypatch):
    require("cpp", "vq_nearest")
    x = torch.zeros(1)
    assert pick("vq_nearest", IMPLS, x, shape={"N": 10, "K": 10, "D": 16})[0] == "cpp"
    monkeypatch.setitem(backends.AUTO_RULES["cpu"], "vq_nearest", {"cpp": lambda N, K, D: D < 64})
    assert pick("vq_nearest", IMPLS, x, shape={"N": 10, "K": 10, "D": 16})[0] == "cpp"
    assert pick("vq_nearest", IMPLS, x, shape={"N": 10, "K": 10, "D": 256})[0] == "torch"
    assert pick("vq_nearest", IMPLS, x, "cpp", shape={"N": 10, "K": 10, "D": 256})[0] == "cpp"  # explicit wins
    monkeypatch.setitem(backends.AUTO_RULES["cpu"], "vq_nearest", {})
    assert pick("vq_nearest", IMPLS, x)[0] == "torch"  # no measured rule: never picked automatically


_BROKEN_TRITON = "raise ImportError('libcuda.so.1: cannot open shared object file')\n"


def test_broken_triton_is_reported(tmp_path):
    """Triton installed but failing to import: `info` and the error say so; nothing crashes."""
    fake = tmp_path / "triton"
    fake.mkdir()
    (fake / "__init__.py").write_text(_BROKEN_TRITON)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-m", "dera_fast", "info"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "BROKEN" in out.stdout and "libcuda.so.1" in out.stdout
    code = ("import torch\nfrom dera_fast.ops import vq_nearest\n"
            "print(vq_nearest(torch.randn(3, 4), torch.randn(5, 4)).shape[0])\n"
            "try:\n    vq_nearest(torch.randn(3, 4), torch.randn(5, 4), backend='triton')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()[:2]
    assert first == "3"
    assert second.startswith("BackendUnavailableError") and "fails to import" in second and "libcuda" in second
