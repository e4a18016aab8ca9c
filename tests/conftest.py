"""Shared test fixtures: seeding, the `backend` fixture, the tolerance rule.

TRITON_INTERPRET=1 is set here, before anything imports Triton, so that the Triton kernels run on CPU tensors
(fp32/fp16 only: the interpreter gets bf16 tl.dot wrong). Set TRITON_INTERPRET=0 in the environment to opt out.
"""
import os
import signal
import subprocess
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from dera_fast import backends  # noqa: E402

# NOTE: the test shapes are tiny; with two intra-op threads OpenMP spin-waits cost more than the work (measured
# 4x to 25x slower on the 2-core CI machine), so the suite runs single-threaded.
torch.set_num_threads(1)
HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
# Per-dtype absolute floor of the tolerance rule (flash-attention's values).
FLOOR = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-10}


def _device_for(backend: str) -> str:
    """The device ``backend`` is tested on: "cuda" runs on CUDA, "cpp" on the CPU, "triton" and "torch" on CUDA
    when present, else on the CPU (Triton through its interpreter)."""
    if backend in ("cuda", "cpp"):
        return "cuda" if backend == "cuda" else "cpu"
    return "cuda" if HAS_CUDA else "cpu"


def require(backend: str, op: str | None = None, *, dtype: torch.dtype | None = None, heavy: bool = False,
            head_dim: int | None = None) -> str:
    """The device to test ``backend`` on for ``op``, or pytest.skip with the reason it cannot run there.

    The one skip helper of the suite: every test that needs a backend (or Triton, or the extension) calls it.
    ``dtype``: skips bf16 on the Triton interpreter (it computes bf16 tl.dot wrongly, silently); ``heavy``: the
    shape is too slow for the interpreter (~1 ms per program), so it runs on the GPU only; ``head_dim`` (attention):
    skips head dims the CUDA kernels are not instantiated for.
    """
    device = _device_for(backend)
    why = backends.why_unavailable(backend, op, device)
    if why is not None:
        pytest.skip(f"{backend} cannot run {op or 'here'}: {why}")
    if backend == "triton" and device == "cpu":
        if dtype == torch.bfloat16:
            pytest.skip("Triton interpreter gets bf16 tl.dot wrong; bf16 Triton runs on the GPU only")
        if heavy:
            pytest.skip("too slow for the Triton interpreter; runs on the GPU")
    if backend == "cuda" and op == "attention" and head_dim is not None:
        from dera_fast.ops.attention import CUDA_HEAD_DIMS
        if head_dim not in CUDA_HEAD_DIMS:
            pytest.skip(f"CUDA kernels cover head dims {CUDA_HEAD_DIMS}, not {head_dim}")
    return device


def _backend_params():
    for name in backends.BACKENDS:
        why = backends.why_unavailable(name, None, _device_for(name))
        marks = [pytest.mark.skip(reason=f"{name} unavailable: {why}")] if why else []
        yield pytest.param(name, marks=marks, id=name)


@pytest.fixture(params=list(_backend_params()))
def backend(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def assert_encode_is_batch_invariant(model, x):
    """Eval-mode ``model.encode`` is deterministic, and a clip's ids do not depend on the batch it is encoded in."""
    ids = model.encode(x)
    torch.testing.assert_close(model.encode(x), ids)
    for i in range(x.shape[0]):
        torch.testing.assert_close(model.encode(x[i:i + 1]), ids[i:i + 1])


def assert_close_to_ref(name, out, ref_fp32, ref_lowp, floor=None):
    """The flash-attention rule: max|out - ref| <= 2 * max|ref_lowp - ref| + floor[dtype].

    ``ref_lowp`` is what plain PyTorch achieves in ``out``'s dtype; ``ref_fp32`` is the fp32 (or fp64) truth.
    ``ref_lowp=None`` (two computations that should agree, no low-precision baseline): the floor alone.
    """
    out, ref_fp32 = out.detach(), ref_fp32.detach()
    assert out.shape == ref_fp32.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref_fp32.shape)}"
    floor = FLOOR[out.dtype] if floor is None else floor
    diff = (out.double() - ref_fp32.double()).abs()
    base = 0.0
    if ref_lowp is not None and ref_fp32.numel():
        base = (ref_lowp.detach().double() - ref_fp32.double()).abs().max().item()
    err = diff.max().item() if diff.numel() else 0.0
    assert not torch.isnan(out).any(), f"{name}: output has NaN"
    assert err <= 2 * base + floor, (
        f"{name}: max err {err:.3e} (mean {diff.mean().item():.3e}) > 2*{base:.3e} + {floor:g}")



def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (read from /proc; torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def run_process_group(cmd: list[str], *, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """``subprocess.run`` for commands that start children of their own (torchrun), which never hangs the suite.

    Why: ``subprocess.run(..., timeout=)`` kills only the direct child and then waits for the output pipes, which
    torchrun's workers (in sessions of their own) keep open, so a hung worker hung the whole test run. Here the output
    goes to files, and on timeout torchrun gets SIGTERM (it stops its workers), then every descendant gets SIGKILL.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            family = _descendants(proc.pid)
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            for pid in [proc.pid, *family]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if timed_out:
        stderr += f"\n[run_process_group: killed after {timeout} s]"
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def exit_worker(code: int = 0) -> None:
    """End a spawned / torchrun worker process now, skipping interpreter teardown. Why: torch's gloo process group
    can deadlock in its destructor (it joins its worker thread while holding the GIL, and that thread may still need
    the GIL to free a finished work item); seen once as a CI hang in the DDP test of test_sacp.py."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
