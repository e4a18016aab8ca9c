"""VQ op family: every backend against the pure-PyTorch reference, plus registration and bad input."""
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close_to_ref, require
from dera_fast import backends
from dera_fast.ops import codebook_cross_entropy, vq_nearest, vq_sample, vq as vq_mod

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]
# (N, K, D, heavy): "heavy" shapes are too slow for the Triton interpreter (~1 ms per program) and run only on
# the torch and C++ backends on CPU, and on every backend on a GPU.
SHAPES = [
    pytest.param(1, 1, 8, False, id="N1-K1-D8"),
    pytest.param(1, 8192, 16, False, id="N1-K8192-D16"),
    pytest.param(257, 1031, 33, False, id="N257-K1031-D33"),
    pytest.param(64, 1031, 256, False, id="N64-K1031-D256"),
    pytest.param(8193, 1, 8, False, id="N8193-K1-D8"),
    pytest.param(8193, 1031, 16, True, id="N8193-K1031-D16"),
    pytest.param(8193, 8192, 16, True, id="N8193-K8192-D16"),
    pytest.param(1000, 8192, 256, True, id="N1000-K8192-D256"),
]


def _scores64(z, cb, metric):
    """fp64 score of every (row, code) pair: lower is nearer."""
    z64, c64 = z.double(), cb.double()
    if metric == "cosine":
        return -(F.normalize(z64, dim=1) @ F.normalize(c64, dim=1).t())
    return torch.cdist(z64, c64) ** 2


# ------------------------------------------------------------------------------------------------ vq_nearest
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, K, D, heavy", SHAPES)
def test_vq_nearest_matches_reference(backend, N, K, D, heavy, dtype, metric):
    device = require(backend, "vq_nearest", dtype=dtype, heavy=heavy)
    z = torch.randn(N, D, device=device).to(dtype)
    cb = torch.randn(K, D, device=device).to(dtype)
    idx = vq_nearest(z, cb, metric=metric, backend=backend)
    ref = vq_nearest(z, cb, metric=metric, backend="torch")
    assert idx.dtype == torch.int64 and idx.shape == (N,)
    assert int(idx.min()) >= 0 and int(idx.max()) < K
    # same index, or a tie within fp32 rounding of the scores (the inputs in `dtype` are exact in fp32)
    s = _scores64(z, cb, metric)
    picked, best = s.gather(1, idx[:, None]), s.gather(1, ref[:, None])
    tol = 1e-5 * (1 + s.abs().max().item())
    assert (picked <= best + tol).all(), f"worse code on {(picked > best + tol).sum().item()} rows"
    assert (idx == ref).float().mean().item() >= 0.99


def test_vq_nearest_reference_is_exact_argmin():
    z, cb = torch.randn(300, 7), torch.randn(50, 7)
    assert torch.equal(vq_nearest(z, cb, backend="torch"), torch.cdist(z.double(), cb.double()).argmin(1))
    expect = (F.normalize(z.double(), dim=1) @ F.normalize(cb.double(), dim=1).t()).argmax(1)
    assert torch.equal(vq_nearest(z, cb, metric="cosine", backend="torch"), expect)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_vq_nearest_first_index_on_ties(backend, metric):
    device = require(backend, "vq_nearest")
    cb = torch.randn(300, 16, device=device)
    for dup in (7, 150, 299):  # duplicates in the same tile and in later tiles
        cb[dup] = cb[3]
    z = cb[[3, 3, 3]] + 1e-3 * torch.randn(3, 16, device=device)
    z[0] = cb[3]
    assert vq_nearest(z, cb, metric=metric, backend=backend).tolist() == [3, 3, 3]


def test_vq_nearest_batch_invariant(backend):
    device = require(backend, "vq_nearest")
    z, cb = torch.randn(600, 16, device=device), torch.randn(1031, 16, device=device)
    full = vq_nearest(z, cb, backend=backend)
    for rows in (slice(0, 1), slice(5, 22), slice(100, 357)):
        assert torch.equal(vq_nearest(z[rows].clone(), cb, backend=backend), full[rows])


# ------------------------------------------------------------------------------------------------ vq_sample
def _chi_square_pvalue(counts, probs):
    from scipy.stats import chisquare

    expected = probs * counts.sum()
    keep = expected > 5  # merge rare codes into one bin so the chi-square approximation holds
    obs = torch.cat([counts[keep], counts[~keep].sum(0, keepdim=True)]).double()
    exp = torch.cat([expected[keep], expected[~keep].sum(0, keepdim=True)]).double()
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue


@pytest.mark.parametrize("dtype", DTYPES)
def test_vq_sample_distribution(backend, dtype):
    device = require(backend, "vq_sample", dtype=dtype)
    K, D, tau, n = 37, 16, 0.2, 20000
    cb = torch.randn(K, D, device=device)
    z = torch.randn(1, D, device=device).to(dtype).expand(n, D).contiguous()
    gen = torch.Generator(device=device).manual_seed(1234)
    ids = vq_sample(z, cb, temperature=tau, generator=gen, backend=backend)
    probs = (F.normalize(z[:1].double(), dim=1) @ F.normalize(cb.double(), dim=1).t() / tau).softmax(1)[0]
    counts = torch.bincount(ids.cpu(), minlength=K)
    assert _chi_square_pvalue(counts, probs.cpu()) > 1e-3


def test_vq_sample_reproducible_and_backends_agree(backend):
    device = require(backend, "vq_sample")
    z, cb = torch.randn(500, 16, device=device), torch.randn(300, 16, device=device)

    def draw(be):
        return vq_sample(z, cb, temperature=0.05, generator=torch.Generator(device=device).manual_seed(7),
                         backend=be)

    a = draw(backend)
    assert torch.equal(a, draw(backend))
    # one uniform per row from the same generator: the inverse CDF picks the same code up to rounding at bins
    assert (a == draw("torch")).float().mean().item() >= 0.99


def test_vq_sample_low_temperature_is_argmax(backend):
    device = require(backend, "vq_sample")
    z, cb = torch.randn(100, 16, device=device), torch.randn(64, 16, device=device)
    ids = vq_sample(z, cb, temperature=1e-4, generator=torch.Generator(device=device).manual_seed(0),
                    backend=backend)
    assert torch.equal(ids, vq_nearest(z, cb, metric="cosine", backend="torch"))


# ------------------------------------------------------------------------------------------------ cross-entropy
CE_SHAPES = [pytest.param(1, 1, 8, id="N1-K1-D8"), pytest.param(67, 1031, 16, id="N67-K1031-D16"),
             pytest.param(130, 257, 33, id="N130-K257-D33"), pytest.param(33, 100, 256, id="N33-K100-D256")]


def _ce_ref_lowp(h, cb, t, temperature):
    """What plain PyTorch achieves in the inputs' own dtype."""
    logits = F.normalize(h, dim=1) @ F.normalize(cb, dim=1).t() / temperature
    return F.cross_entropy(logits.float(), t, reduction="none")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, K, D", CE_SHAPES)
def test_codebook_cross_entropy_matches_reference(backend, N, K, D, dtype):
    device = require(backend, "codebook_cross_entropy", dtype=dtype)
    h = torch.randn(N, D, device=device).to(dtype)
    cb = torch.randn(K, D, device=device).to(dtype)
    t = torch.randint(0, K, (N,), device=device)
    temp = 0.5

    def run(fn, dt):
        hh, cc = h.to(dt).detach().requires_grad_(), cb.to(dt).detach().requires_grad_()
        loss = fn(hh, cc)
        g = torch.linspace(0.5, 1.5, N, device=device, dtype=loss.dtype)  # non-uniform upstream grads
        (loss * g).sum().backward()
        return loss, hh.grad, cc.grad

    out = run(lambda a, b: codebook_cross_entropy(a, b, t, temperature=temp, reduction="none",
                                                  backend=backend), dtype)
    ref = run(lambda a, b: codebook_cross_entropy(a, b, t, temperature=temp, reduction="none",
                                                  backend="torch"), torch.float32)
    lowp = run(lambda a, b: _ce_ref_lowp(a, b, t, temp), dtype)
    for name, o, r, lp in zip(("loss", "dh", "dcodebook"), out, ref, lowp):
        assert o.dtype == (torch.float32 if name == "loss" else dtype)
        assert_close_to_ref(name, o, r, lp, floor=1e-5 if dtype == torch.float32 else None)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_codebook_cross_entropy_reductions(reduction):
    h, cb, t = torch.randn(20, 8), torch.randn(30, 8), torch.randint(0, 30, (20,))
    logits = F.normalize(h, dim=1) @ F.normalize(cb, dim=1).t() / 0.7
    want = F.cross_entropy(logits, t, reduction=reduction)
    torch.testing.assert_close(codebook_cross_entropy(h, cb, t, temperature=0.7, reduction=reduction), want)


def test_codebook_cross_entropy_gradcheck_reference():
    h = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    cb = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 9, (6,))
    # the public op takes fp32/bf16/fp16; the reference (plus the normalisation the op applies) is checked in fp64
    fn = lambda a, b: vq_mod.codebook_ce_ref(F.normalize(a, dim=1), F.normalize(b, dim=1), t, 1 / 0.3)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h, cb))


# ------------------------------------------------------------------------------------------------ registration
def _opcheck_cases(backend, device):
    z, cb = torch.randn(33, 16, device=device), torch.randn(70, 16, device=device)
    cbn = F.normalize(cb, dim=1)
    bias = (cb * cb).sum(1)
    u = torch.rand(33, device=device)
    t = torch.randint(0, 70, (33,), device=device)
    hn = F.normalize(z, dim=1).requires_grad_()
    cbg = cbn.clone().requires_grad_()
    if backend == "triton":
        ops = torch.ops.dera_fast
        return [(ops.vq_nearest_triton, (z, cb, bias)), (ops.vq_sample_triton, (z, cbn, u, 20.0)),
                (ops.codebook_ce_triton, (hn, cbg, t, 2.0))]
    ops, cases = torch.ops.dera_fast_C, []
    for op, name, args in (("vq_nearest", "vq_nearest", (z, cb, bias)), ("vq_sample", "vq_sample", (z, cbn, u, 20.0)),
                           ("codebook_cross_entropy", "codebook_ce_fwd", (hn, cbg, t, 2.0))):
        if backends.why_unavailable(backend, op, device) is None:
            cases.append((getattr(ops, name), args))
    return cases


def test_opcheck(backend):
    if backend == "torch":
        pytest.skip("the torch backend is plain PyTorch, not a custom op")
    device = require(backend)
    cases = _opcheck_cases(backend, device)
    if not cases:
        pytest.skip(f"no {backend} custom ops on {device}")
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_compile_fullgraph(backend):
    device = require(backend, "vq_nearest")
    torch._dynamo.reset()
    z, cb = torch.randn(40, 16, device=device), torch.randn(90, 16, device=device)
    t = torch.randint(0, 90, (40,), device=device)

    def f(z, cb):
        return vq_nearest(z, cb, metric="cosine", backend=backend)

    assert torch.equal(torch.compile(f, fullgraph=True)(z, cb), f(z, cb))
    if backends.why_unavailable(backend, "codebook_cross_entropy", device) is None:
        ce = lambda h, c: codebook_cross_entropy(h, c, t, temperature=0.5, backend=backend)  # noqa: E731
        torch.testing.assert_close(torch.compile(ce, fullgraph=True)(z, cb), ce(z, cb))
    if backends.why_unavailable(backend, "vq_sample", device) is None:
        # fullgraph with a generator argument: draw uniforms inside the graph from the global RNG
        smp = lambda a, b: vq_sample(a, b, temperature=0.1, backend=backend)  # noqa: E731
        ids = torch.compile(smp, fullgraph=True)(z, cb)
        assert ids.shape == (40,) and int(ids.max()) < 90


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("fn", ["nearest", "sample", "ce"])
def test_bad_input(fn):
    z, cb, t = torch.randn(5, 8), torch.randn(11, 8), torch.randint(0, 11, (5,))
    call = {
        "nearest": lambda z, cb: vq_nearest(z, cb),
        "sample": lambda z, cb: vq_sample(z, cb, temperature=0.1),
        "ce": lambda z, cb: codebook_cross_entropy(z, cb, t),
    }[fn]
    zname = "h" if fn == "ce" else "z"
    with pytest.raises(ValueError, match=zname):
        call(z[0], cb)  # wrong rank
    with pytest.raises(TypeError, match=zname):
        call(z.long(), cb)  # integer dtype
    with pytest.raises(ValueError, match="D=8"):
        call(z, torch.randn(11, 9))  # D mismatch
    with pytest.raises(ValueError, match="empty"):
        call(z[:0], cb)
    with pytest.raises(ValueError, match="codebook"):
        call(z, cb[:0])
    with pytest.raises(ValueError, match="device"):
        call(z, cb.to("meta"))
    bad = z.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        call(bad, cb)


def test_bad_scalar_arguments():
    z, cb, t = torch.randn(5, 8), torch.randn(11, 8), torch.randint(0, 11, (5,))
    for temp in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            vq_sample(z, cb, temperature=temp)
        with pytest.raises(ValueError, match="temperature"):
            codebook_cross_entropy(z, cb, t, temperature=temp)
    with pytest.raises(TypeError, match="temperature"):
        vq_sample(z, cb, temperature="hot")
    with pytest.raises(ValueError, match="target"):
        codebook_cross_entropy(z, cb, torch.tensor([0, 1, 2, 3, 11]))
    with pytest.raises(ValueError, match="target"):
        codebook_cross_entropy(z, cb, torch.tensor([0, -1, 2, 3, 4]))
    with pytest.raises(ValueError, match="target"):
        codebook_cross_entropy(z, cb, t[:4])
    with pytest.raises(ValueError, match="metric"):
        vq_nearest(z, cb, metric="dot")
    with pytest.raises(ValueError, match="reduction"):
        codebook_cross_entropy(z, cb, t, reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        vq_nearest(z, cb, backend="cuBLAS")


def test_value_checks_can_be_disabled():
    from dera_fast.ops import value_checks

    z, cb = torch.randn(5, 8), torch.randn(11, 8)
    z[0, 0] = float("nan")
    with value_checks(False):
        vq_nearest(z, cb, backend="torch")  # no sync-costing check, no error
        with value_checks(True):  # blocks nest
            with pytest.raises(ValueError):
                vq_nearest(z, cb, backend="torch")
        vq_nearest(z, cb, backend="torch")
    with pytest.raises(ValueError):
        vq_nearest(z, cb, backend="torch")
    # a plain call (as the README writes it) switches the checks until the next call
    try:
        value_checks(False)
        vq_nearest(z, cb, backend="torch")
    finally:
        value_checks(True)
    with pytest.raises(ValueError, match="vq_nearest: z contains NaN"):
        vq_nearest(z, cb, backend="torch")


def test_triton_shape_limit_falls_back_in_auto_and_raises_when_explicit():
    if "triton" not in backends.available("cpu"):
        pytest.skip("Triton unavailable on CPU here")
    z, cb = torch.randn(3, vq_mod._TRITON_MAX_D + 1), torch.randn(4, vq_mod._TRITON_MAX_D + 1)
    assert vq_nearest(z, cb).shape == (3,)  # auto: C++ or torch
    with pytest.raises(backends.BackendUnavailableError, match="supports"):
        vq_nearest(z, cb, backend="triton")


_ISA_PROBE = """
import torch, torch.nn.functional as F
from dera_fast.ops import vq_nearest
torch.manual_seed(0)
bad = 0
for N, K, D in [(1, 1, 8), (257, 1031, 33), (100, 70, 256), (37, 5, 3), (1000, 513, 16)]:
    z, cb = torch.randn(N, D), torch.randn(K, D)
    cb[K // 2] = cb[0]  # a duplicate code: the first index must win
    z[0] = cb[0]
    for metric in ("l2", "cosine"):
        got, ref = vq_nearest(z, cb, metric=metric, backend="cpp"), vq_nearest(z, cb, metric=metric, backend="torch")
        s = torch.cdist(z.double(), cb.double()) ** 2 if metric == "l2" else -(F.normalize(z.double(), dim=1)
                                                                               @ F.normalize(cb.double(), dim=1).t())
        tol = 1e-5 * (1 + s.abs().max().item())
        bad += int((s.gather(1, got[:, None]) > s.gather(1, ref[:, None]) + tol).sum()) + int(got[0] != 0)
        if N > 1:
            bad += int(not torch.equal(vq_nearest(z[1:].clone(), cb, metric=metric, backend="cpp"), got[1:]))
print("bad", bad)
"""


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
def test_vq_nearest_cpp_isa_variants(isa):
    """The AVX-512, AVX2 and portable variants of the C++ kernel (by default this machine adds the AMX-BF16 screen
    to the AVX-512 one) against the reference: nearest up to fp32 rounding, first index on an exact duplicate,
    batch invariance."""
    import os
    import subprocess
    import sys

    require("cpp", "vq_nearest")
    env = {**os.environ, "DERA_FAST_CPU_ISA": isa, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _ISA_PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["bad", "0"], out.stdout


# Adversarial inputs for the AMX-BF16 screening pass (csrc/vq_amx_cpu.cpp): its answers must be bitwise the fp32
# tile's, so the probe runs once with DERA_FAST_CPU_ISA=amx and once with avx512 and the ids are compared.
_AMX_PROBE = """
import sys, torch, torch.nn.functional as F
from dera_fast.ops import vq_nearest
torch.manual_seed(0)
cases = []
def add(z, cb, metric="l2"):
    cases.append(vq_nearest(z, cb, metric=metric, backend="cpp"))
for N, K, D in [(16, 100, 32), (17, 1000, 47), (32, 1, 64), (33, 5, 64), (64, 1031, 65), (257, 17, 100), (100, 70, 256), (40, 300, 1000),
                (512, 2048, 128)]:
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        z, cb = torch.randn(N, D).to(dt), torch.randn(K, D)
        add(z, cb)
        add(z, cb, "cosine")
        # batch invariance: every row alone (the screen has a minimum batch; here rows 1..N-1 still take it)
        cases.append(vq_nearest(z[1:].clone(), cb, backend="cpp"))
N, K, D = 300, 512, 96
base = torch.randn(K, D)
# exact duplicates: the first index must win
cb = base.clone(); cb[300:] = cb[:212]
add(cb[torch.randint(0, K, (N,))] + 1e-3 * torch.randn(N, D), cb)
# codes one ulp apart and rows equidistant between two codes (c and -c, z orthogonal to both)
cb = base.clone(); cb[1::2] = torch.nextafter(cb[0::2], torch.full_like(cb[0::2], float("inf")))
add(cb[torch.randint(0, K, (N,))], cb)
cb = base.clone(); cb[K // 2:] = -cb[:K // 2]
z = torch.randn(N, D); z -= (z @ cb[0])[:, None] * cb[0] / cb[0].dot(cb[0])
add(z, cb)
# many near-ties (more than the candidate slots): every code nearly the same
add(torch.randn(N, D), base[:1] + 1e-6 * torch.randn(K, D))
# scales: huge, tiny, denormal, mixed per row, and beyond the screen's limits (fp32 fallback)
for scale in (1e-30, 1e-20, 1e-3, 1e6, 1e15, 1e18):
    add(scale * torch.randn(N, D), scale * base)
z = torch.randn(N, D) * torch.logspace(-20, 20, N)[:, None]
add(z, base)
add(torch.randn(N, D), torch.randn(K, D) * torch.logspace(-10, 10, K)[:, None])
z = torch.randn(N, D); z[::7] *= 1e-41
add(z, base)
# sparse codes and rows (many exact zeros), integer-valued data (many exact ties)
add((torch.rand(N, D) < 0.05).float(), (torch.rand(K, D) < 0.05).float())
add(torch.randint(-2, 3, (N, D)).float(), torch.randint(-2, 3, (K, D)).float())
torch.save(cases, sys.argv[1])
print(torch.ops.dera_fast_C.vq_nearest_cpu_isa())
"""

# Denormals under each flush mode (MXCSR FTZ / DAZ, set through glibc's fenv; MXCSR is per thread, so one thread).
_AMX_FTZ_PROBE = """
import ctypes, ctypes.util, sys, torch
import dera_fast.ops
torch.set_num_threads(1)
libm = ctypes.CDLL(ctypes.util.find_library("m"))
env = ctypes.create_string_buffer(64)
FTZ, DAZ = 1 << 15, 1 << 6
def set_mode(bits):  # x86-64 glibc fenv_t: the MXCSR is the 32-bit word at byte 28
    assert libm.fegetenv(env) == 0
    env[28:32] = ((int.from_bytes(env.raw[28:32], "little") & ~(FTZ | DAZ)) | bits).to_bytes(4, "little")
    assert libm.fesetenv(env) == 0
torch.manual_seed(0)
N, D, K = 48, 64, 40
inputs = []
z = torch.zeros(N, D); z[:, 0] = 2.0**39
cb = torch.zeros(2, D); cb[0, 0] = -(2.0**-130)  # -2c flushes under FTZ alone: code 0 ties code 1 there
inputs.append((z, cb, torch.zeros(2)))
cb = torch.zeros(2, D); cb[0, 0] = -(1.5 * 2.0**-127)
inputs.append((z, cb, torch.zeros(2)))
z = torch.zeros(N, D); z[:, 0] = 1e-39
cb = torch.zeros(2, D); cb[1, 0] = 2.0**39
inputs.append((z, cb, torch.zeros(2)))
for scale in (2.0**-126, 2.0**-130, 1e-20):
    z = torch.randn(N, D) * torch.where(torch.rand(N, D) < 0.5, scale, 1.0)
    cb = torch.randn(K, D) * torch.where(torch.rand(K, D) < 0.5, scale, 1.0)
    cb[1::2, :8] = cb[0::2, :8] * 2.0**-120
    inputs.append((z, cb, (cb.double() ** 2).sum(1).float()))
out = []
for bits in (0, FTZ, DAZ, FTZ | DAZ):
    set_mode(bits)
    out += [torch.ops.dera_fast_C.vq_nearest(z, cb, bias) for z, cb, bias in inputs]
    set_mode(0)
torch.save(out, sys.argv[1])
print(torch.ops.dera_fast_C.vq_nearest_cpu_isa())
"""


@pytest.mark.parametrize("probe", ["cases", "flush-modes"])
def test_vq_nearest_amx_screen_is_bitwise_the_fp32_kernel(tmp_path, probe):
    """The AMX-BF16 screening pass (on CPUs with AMX) returns exactly the fp32 tile's ids on adversarial inputs:
    duplicates, one-ulp neighbours, equidistant rows, many near-ties, extreme and mixed scales, denormals, half and
    bfloat16 rows, both metrics, batch invariance; and, on one thread, denormals under every flush mode (FTZ, DAZ)."""
    import os
    import platform
    import subprocess
    import sys

    require("cpp", "vq_nearest")
    if backends.cpu_kernel_isa() != "amx":
        pytest.skip(f"no AMX screening here (cpu kernel: {backends.cpu_kernel_isa()})")
    if probe == "flush-modes" and not (platform.system() == "Linux" and platform.machine() == "x86_64"):
        pytest.skip("the flush modes are set through x86-64 glibc's fenv_t")
    ids = {}
    for isa in ("amx", "avx512"):
        path = tmp_path / f"{isa}.pt"
        env = {**os.environ, "DERA_FAST_CPU_ISA": isa}
        code = _AMX_PROBE if probe == "cases" else _AMX_FTZ_PROBE
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split()[-1] == isa
        ids[isa] = torch.load(path, weights_only=True)
    assert len(ids["amx"]) == len(ids["avx512"]) >= 24
    for i, (a, b) in enumerate(zip(ids["amx"], ids["avx512"])):
        assert torch.equal(a, b), f"case {i}: {int((a != b).sum())} rows differ"
