"""Packaging hygiene (issue 13): the repository's kernels/ never shadows an installed ``kernels`` package, and
building a wheel inside the checkout leaves the editable install (and its build record) alone."""
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

from dera_fast import _ext, backends

REPO = pathlib.Path(__file__).resolve().parents[1]
PROBE = "import kernels; print(kernels.NAME, kernels.__file__, kernels.sub.X)"


def _python(code: str, cwd, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=full,
                          timeout=300)


def _fake_site(tmp_path) -> pathlib.Path:
    """A site folder holding an unrelated package named ``kernels`` (like Hugging Face's)."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("NAME = 'third-party'\nfrom . import sub\n")
    (site / "kernels" / "sub.py").write_text("X = 42\n")
    return site


def test_installed_kernels_package_wins_from_the_repo_root(tmp_path):
    site = _fake_site(tmp_path)
    out = _python(PROBE, cwd=REPO, PYTHONPATH=str(site))  # the repo root is sys.path[0] here
    assert out.returncode == 0, out.stderr
    name, path, x = out.stdout.split()
    assert name == "third-party" and pathlib.Path(path).parent == site / "kernels" and x == "42"
    # and dera_fast's own kernels are still importable, from the repo root too
    code = ("import importlib.util as u, kernels\n"  # find_spec: no need to import Triton
            "print(u.find_spec('dera_fast.kernels.vq').origin, kernels.NAME)")
    out = _python(code, cwd=REPO, PYTHONPATH=str(site))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(REPO / "kernels" / "vq.py"), "third-party"]


def test_no_kernels_package_means_import_error_from_the_repo_root():
    out = _python("import kernels", cwd=REPO)
    assert out.returncode != 0 and "ModuleNotFoundError: No module named 'kernels'" in out.stderr


def _digest(path: pathlib.Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


@pytest.mark.skipif(not backends.HAS_EXT, reason="needs the editable install's built extension")
def test_wheel_build_leaves_the_editable_install_alone(tmp_path):
    """`DERA_FAST_BUILD_EXT=0 pip wheel .` inside the checkout must not rewrite the editable install's build record
    (it once disabled the extension that way); `python -m dera_fast info` still shows the extension loaded."""
    pkg = pathlib.Path(_ext.__file__).parent
    watched = [_ext.BUILD_INFO_FILE, *pkg.glob("_C*.so")]
    before = {p: _digest(p) for p in watched}
    top_before = sorted(p.name for p in REPO.iterdir())
    cfg = tmp_path / "build.cfg"  # keep setuptools' own build/ and egg-info folders out of the checkout as well
    cfg.write_text(f"[build]\nbuild_base = {tmp_path / 'build'}\n[egg_info]\negg_base = {tmp_path}\n")
    env = {**os.environ, "DERA_FAST_BUILD_EXT": "0", "DIST_EXTRA_CONFIG": str(cfg), "PIP_NO_INDEX": "1"}
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", ".",
                          "-w", str(tmp_path / "wheels")], cwd=REPO, capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert {p: _digest(p) for p in watched} == before, "the wheel build rewrote the editable install's files"
    assert sorted(p.name for p in REPO.iterdir()) == top_before
    info = subprocess.run([sys.executable, "-m", "dera_fast", "info", "--json"], capture_output=True, text=True,
                          timeout=300)
    assert json.loads(info.stdout)["extension_loaded"] is True
    wheel = next((tmp_path / "wheels").glob("dera_fast-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        record = json.loads(zf.read("dera_fast/_build_info.json"))
    assert record["ext_kind"] == "none" and record["build_mode"] == "0"  # the wheel's own record
    assert {"dera_fast/kernels/vq.py", "dera_fast/kernels/attention.py", "dera_fast/kernels/sacp.py"} <= names
    assert not any(n.startswith("kernels/") for n in names)  # never a top-level `kernels` package
