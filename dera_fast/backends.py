"""The only module that knows backends exist, and the only one that picks one.

Backends (fixed names, also used as pytest ids and benchmark labels); a name says what runs:
  ``"cuda"``   the CUDA kernels of the compiled extension ``dera_fast._C`` (CUDA tensors only);
  ``"triton"`` the Triton kernels in ``dera_fast.kernels`` (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1);
  ``"cpp"``    the C++ CPU kernels of the compiled extension (CPU tensors only; not every op has one);
  ``"torch"``  the pure-PyTorch reference of each op (any device).

Selection order for every op call:
  1. the explicit ``backend=`` argument;
  2. ``use_backend(...)`` (innermost context wins), else the ``DERA_FAST_BACKEND`` environment variable;
  3. automatic: the first backend of :data:`AUTO_ORDER` for the tensor's device that can run the op *and* whose
     :data:`AUTO_RULES` entry says it is at least as fast as the torch path for this shape class; else ``torch``.
Triton runs on CPU tensors only through its interpreter (TRITON_INTERPRET=1, set before Triton is imported), which
is a testing tool roughly a thousand times slower than the reference: it is used only when asked for explicitly.
A backend asked for explicitly (1 or 2) that cannot run raises :class:`BackendUnavailableError`, saying why and
which backends can run the op here. Automatic selection falls back silently.

Availability is probed once (the extension at import, Triton on first use); nothing here runs per call except
dictionary and set lookups, so ``pick`` is safe inside ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import os
import platform
from typing import Callable, Iterator, Mapping

import torch

from . import _ext

BACKENDS = ("cuda", "triton", "cpp", "torch")
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}  # never the Triton interpreter
# public op -> the dera_fast_C schema its "cuda" / "cpp" implementations call
EXT_SCHEMAS = {
    "vq_nearest": "dera_fast_C::vq_nearest",
    "vq_sample": "dera_fast_C::vq_sample",
    "codebook_cross_entropy": "dera_fast_C::codebook_ce_fwd",
    "attention": "dera_fast_C::attention_fwd",
    "gradient_gram": "dera_fast_C::gradient_gram",
    "sacp_project": "dera_fast_C::sacp_combine_",
}
_EXT_BACKEND_DEVICE = {"cuda": "cuda", "cpp": "cpu"}  # the extension backends and the device each runs on
_DEVICE_KEYS = {"CPU": "cpu", "CUDA": "cuda"}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this op on this device."""


def _always(**shape) -> bool:
    return True


# Automatic choice, per device: op -> {backend: rule(**shape) -> bool}. A backend is picked automatically only
# where its rule says it is at least as fast as the torch path for that shape class; each rule names the
# measurement behind it.
AUTO_RULES: dict[str, dict[str, dict[str, Callable[..., bool]]]] = {
    "cpu": {
        # bench/bench_vq.py::bench_vq_nearest_cpu_grid (table: bench/results/cpu-2core/vq_nearest.md): the C++ tile
        # kernel beats the torch path in every cell, D in 8..256, K in {1024, 8192}, N in {1, 64, 4096, 16384}
        # (1 thread: 1.7x-18x; 2 threads: 1.5x-20x).
        "vq_nearest": {"cpp": _always},
        # bench/bench_sacp.py::bench_sacp_cpu_classes (table: bench/results/cpu-2core/bench.md; interleaved rounds):
        # cpp beats the torch path's foreach launches on every class measured, 0.4M params / 22 tensors, dera-l's
        # 85M / 132, four 8M-element tensors, 2000 tensors of 100 elements: 1.9x-20x on 2 threads, 1.5x-5x on 1
        # (BENCH_THREADS=1).
        "gradient_gram": {"cpp": _always},
        "sacp_project": {"cpp": _always},
    },
    # NOTE: unmeasured: no GPU session has run these kernels yet. bench/gpu_bringup.sh measures every op against
    # the torch path on the GPU; until then the fused kernels are preferred where the torch path materialises an
    # N x K (VQ) or Lq x Lk (masked attention) buffer or runs many small launches (SACP), and torch's SDPA
    # (FlashAttention / cuDNN) is kept for plain dense attention, where it is the stronger baseline.
    "cuda": {
        "vq_nearest": {"cuda": _always, "triton": _always},
        "vq_sample": {"cuda": _always, "triton": _always},
        "codebook_cross_entropy": {"cuda": _always, "triton": _always},
        "attention": {b: (lambda varlen=False, masked=False, **_: varlen or masked) for b in ("cuda", "triton")},
        "gradient_gram": {"cuda": _always, "triton": _always},
        "sacp_project": {"cuda": _always, "triton": _always},
    },
}


_CPU_ISA_OP = "dera_fast_C::vq_nearest_cpu_isa"  # an informational query, not a kernel


def cpu_kernel_isa() -> str | None:
    """The variant the C++ CPU vq_nearest runs here: "amx" (AVX-512 tile plus an AMX-BF16 screening pass, same
    answers), "avx512", "avx2" or "scalar" (DERA_FAST_CPU_ISA caps it); None without the extension."""
    if not _ext.HAS_EXT or not hasattr(torch.ops.dera_fast_C, "vq_nearest_cpu_isa"):
        return None
    return torch.ops.dera_fast_C.vq_nearest_cpu_isa()


def _probe_ext_ops() -> dict[str, frozenset[str]]:
    """Map each registered ``dera_fast_C::<op>`` to the device types it has kernels for."""
    if not _ext.HAS_EXT:
        return {}
    table = {}
    for name in torch._C._dispatch_get_all_op_names():
        if name.startswith("dera_fast_C::") and name != _CPU_ISA_OP:
            table[name] = frozenset(dev for key, dev in _DEVICE_KEYS.items()
                                    if torch._C._dispatch_has_kernel_for_dispatch_key(name, key))
    return table


HAS_EXT = _ext.HAS_EXT
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
EXT_OPS = _probe_ext_ops()
_ENV_BACKEND = os.environ.get("DERA_FAST_BACKEND", "auto").strip().lower() or "auto"
_override: list[str] = []  # stack managed by use_backend()
_triton: dict = {}  # filled once by _triton_probe()


@torch.compiler.assume_constant_result
def _triton_probe() -> str:
    """"" if Triton imports, else why not. Probed on first use (importing Triton costs ~0.2 s); torch.compile
    treats the answer as a constant, so the probe never runs inside a traced region."""
    if "why" not in _triton:
        if importlib.util.find_spec("triton") is None:
            why = "Triton is not installed (pip install 'dera-fast[triton]')"
        else:
            try:
                importlib.import_module("triton")
                importlib.import_module("triton.language")
                why = ""
            except Exception as e:  # noqa: BLE001 - any failure to import means the backend cannot run
                why = (f"Triton {triton_version() or '(unknown version)'} is installed but fails to import: "
                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        _triton["why"] = why
    return _triton["why"]


def triton_version() -> str | None:
    """The installed Triton's version (whether or not it imports), or None."""
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def _check_name(name: str, what: str) -> str:
    name = name.strip().lower()
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{what}={name!r}: expected 'auto' or one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every op inside the block on backend ``name`` ("auto" restores automatic selection)."""
    _override.append(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _override.pop()


def why_unavailable(backend: str, op: str | None = None, device: str = "cpu") -> str | None:
    """None if ``backend`` can run ``op`` on ``device`` ("cpu" or "cuda"), else the reason it cannot.

    ``op`` is a public op name (``"vq_nearest"``, ``"attention"``, ...; see :data:`EXT_SCHEMAS`); None asks
    whether the backend can run on ``device`` at all (some op has a kernel there). Shape limits of individual
    kernels (e.g. head dims) are not considered here; :func:`pick` checks them per call.
    """
    backend = _check_name(backend, "backend")
    device = torch.device(device).type
    if backend in ("auto", "torch"):
        return None
    if backend == "triton":
        why = _triton_probe()
        if why:
            return why
        if device == "cuda" or (device == "cpu" and TRITON_INTERPRET):
            return None
        return (f"Triton runs on CUDA tensors, or on CPU tensors only when TRITON_INTERPRET=1 is set before "
                f"Triton is imported; got a {device} tensor")
    want = _EXT_BACKEND_DEVICE[backend]
    if device != want:
        other = "cpp" if backend == "cuda" else "cuda"
        kind = "CUDA" if backend == "cuda" else "C++ CPU"
        return (f"the {backend!r} backend runs the extension's {kind} kernels on {want} tensors, got a {device} "
                f"tensor (the {other!r} backend is for {device} tensors)")
    if not HAS_EXT:
        return f"the C++/CUDA extension is not loaded ({_ext.EXT_ERROR}); rebuild with `{_ext.REBUILD_CMD}`"
    if op is None:
        if any(device in devs for devs in EXT_OPS.values()):
            return None
        return f"the extension has no {device} kernels" + _build_hint(device)
    if op not in EXT_SCHEMAS:
        return f"no op named {op!r} (known: {sorted(EXT_SCHEMAS)})"
    schema = EXT_SCHEMAS[op]
    if schema not in EXT_OPS:
        return f"the extension has no {op} op (rebuild with `{_ext.REBUILD_CMD}` if it is stale)"
    if device not in EXT_OPS[schema]:
        return f"the extension has no {device} kernel for {op}" + _build_hint(device)
    return None


def _build_hint(device: str) -> str:
    return (" (build with DERA_FAST_BUILD_EXT=cuda on a machine with a CUDA torch and nvcc)"
            if device == "cuda" else "")


def _unsupported(name: str, supports: Mapping[str, Callable[[], bool]] | None) -> str | None:
    if supports is not None and name in supports and not supports[name]():
        return f"these inputs are outside what its {name} kernel supports"
    return None


def pick(op: str, impls: Mapping[str, Callable], x: torch.Tensor, backend: str | None = None, *,
         supports: Mapping[str, Callable[[], bool]] | None = None, shape: Mapping | None = None
         ) -> tuple[str, Callable]:
    """Choose the implementation of ``op`` for an input living on ``x.device``.

    Args:
        op: the op's public name (a key of :data:`EXT_SCHEMAS`), used in messages and to find its rules.
        impls: backend name -> implementation.
        x: a representative input tensor (its device decides).
        backend: the caller's explicit choice, or None.
        supports: backend -> zero-argument predicate saying whether that backend handles these inputs
            (shape limits); checked after availability, for explicit and automatic choices.
        shape: the shape class of the call, passed to the :data:`AUTO_RULES` of ``op`` (automatic choice only).
    Returns:
        (backend name, implementation).
    """
    requested = _check_name(backend, "backend") if backend is not None else "auto"
    if requested == "auto":
        requested = _override[-1] if _override else _check_name(_ENV_BACKEND, "DERA_FAST_BACKEND")
    device = x.device.type
    if requested != "auto":
        why = (f"{op} has no {requested!r} backend" if requested not in impls
               else why_unavailable(requested, op, device) or _unsupported(requested, supports))
        if why is not None:
            usable = [b for b in BACKENDS if b in impls and why_unavailable(b, op, device) is None
                      and _unsupported(b, supports) is None]
            raise BackendUnavailableError(f"{op}: backend {requested!r} is unavailable: {why}. "
                                          f"Usable here: {usable}")
        return requested, impls[requested]
    rules = AUTO_RULES.get(device, {}).get(op, {})
    for name in AUTO_ORDER.get(device, ()):
        if name == "torch":
            break
        if (name in impls and name in rules and why_unavailable(name, op, device) is None
                and _unsupported(name, supports) is None and rules[name](**(shape or {}))):
            return name, impls[name]
    return "torch", impls["torch"]


def available(device: str = "cpu") -> list[str]:
    """Backends usable in principle on ``device`` ("cpu" or "cuda"); individual ops may still lack a kernel."""
    return [b for b in BACKENDS if why_unavailable(b, None, device) is None]


def info() -> dict:
    """What is installed and usable: versions, build info, backends per device (with reasons), GPU."""
    cuda_ok = torch.cuda.is_available()
    triton_why = _triton_probe()
    devices = ("cpu", "cuda") if cuda_ok else ("cpu",)
    return {
        "dera_fast": (_ext.BUILD_INFO or {}).get("version", "unknown"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if cuda_ok else None,
        "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda_ok else None,
        "triton": triton_version(),
        "triton_usable": not triton_why,
        "triton_error": triton_why or None,
        "triton_interpret": TRITON_INTERPRET,
        "extension_loaded": HAS_EXT,
        "extension_error": _ext.EXT_ERROR,
        "build": _ext.BUILD_INFO,
        "extension_ops": {k.split("::")[1]: sorted(v) for k, v in sorted(EXT_OPS.items())},
        "cpu_kernel_isa": cpu_kernel_isa(),
        "backends_cpu": available("cpu"),
        "backends_cuda": available("cuda") if cuda_ok else [],
        # why each backend that targets a device cannot run there (the cuda/cpp split is not listed: by name)
        "unavailable": {dev: {b: why_unavailable(b, None, dev) for b in BACKENDS
                              if _EXT_BACKEND_DEVICE.get(b, dev) == dev and why_unavailable(b, None, dev)}
                        for dev in devices},
        "env_backend": _ENV_BACKEND,
    }
