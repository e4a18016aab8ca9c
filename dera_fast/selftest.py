"""Self-test of every op on every usable backend and device against its reference (``python -m dera_fast selftest``).

Each *case* is one op in one variant on one shape (awkward ones, 1 / primes / non-powers of two, and the real model
shapes: the tiny preset everywhere, dera-l on CUDA); it runs on every backend of the device and is compared with the
op's reference. A backend that cannot run the case (no extension, no Triton, Triton on CPU without the interpreter,
a head dim its kernels lack, a shape too slow for the interpreter) gives a "skip" row with the reason, never a crash.

Tolerances (the test suite's rules, tests/conftest.py):
  * float outputs: max |out - ref_fp32| <= 2 * max |ref_lowp - ref_fp32| + floor[dtype], where ref_lowp is plain
    PyTorch in the input dtype (the flash-attention rule);
  * ``vq_nearest``: the picked code is as near as the reference's up to fp32 rounding of the scores (1e-5 relative);
  * ``vq_sample``: the same generator draws the same codes as the torch path on >= 99% of the rows;
  * ``gradient_gram``: relative to the norms, 1e-5 (fp32 accumulation).
With ``bench=True`` every row also gets its time and the torch path's time on the same inputs, timed in the same
run (best of a few calls), and their ratio.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from . import backends
from .ops import attention, attention_ref, codebook_cross_entropy, gradient_gram, sacp_project, vq_nearest, vq_sample
from .ops.sacp import gradient_gram_ref, sacp_project_ref

FLOOR = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
DEVICE_BACKENDS = {"cpu": ("cpp", "triton", "torch"), "cuda": ("cuda", "triton", "torch")}
INTERPRETER_MAX_WORK = 2e7  # N*K*D or B*H*L^2*D above which a case is too slow for the Triton interpreter


@dataclasses.dataclass
class Row:
    """One line of the table / one JSON record."""

    op: str
    variant: str
    backend: str
    device: str
    shape: str
    dtype: str
    status: str  # "pass", "fail" or "skip"
    max_err: float | None = None
    tol: float | None = None
    reason: str = ""
    ms: float | None = None
    torch_ms: float | None = None

    @property
    def speedup(self) -> float | None:
        return self.torch_ms / self.ms if self.ms and self.torch_ms else None

    def record(self) -> dict:
        return {**dataclasses.asdict(self), "speedup": self.speedup}


class Skip(Exception):
    """This backend cannot run this case; the message says why."""


@dataclasses.dataclass
class Case:
    op: str
    variant: str
    shape: str
    dtype: torch.dtype
    work: float  # rough FLOP count, to keep the Triton interpreter to small cases
    # run(backend, device) -> (max_err, tol, call): checks the backend and returns a zero-argument call for timing
    run: Callable[[str, str], tuple[float, float, Callable[[], object]]]


# ---------------------------------------------------------------------------------------------------------------
# comparison helpers
# ---------------------------------------------------------------------------------------------------------------
def _rule(name: str, out: torch.Tensor, ref: torch.Tensor, lowp: torch.Tensor | None) -> tuple[float, float]:
    """(max error, tolerance) of the flash-attention rule; NaN in ``out`` counts as an infinite error."""
    floor = FLOOR.get(out.dtype, FLOOR[torch.float32])
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}")
    err = (out - ref).abs().max().item() if out.numel() else 0.0
    base = (lowp.detach().double() - ref).abs().max().item() if lowp is not None and ref.numel() else 0.0
    return (math.inf if math.isnan(err) else err), 2 * base + floor


def _worst(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    """The (err, tol) pair with the largest err / tol."""
    return max(pairs, key=lambda p: p[0] / p[1] if p[1] else math.inf)


def _grads(out: torch.Tensor, inputs, dout) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, inputs, dout))


# ---------------------------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------------------------
def _vq_nearest_case(n, k, d, metric, dtype, label, seed) -> Case:
    def run(backend, device):
        g = torch.Generator(device=device).manual_seed(seed)  # the same inputs for every backend
        z = torch.randn(n, d, generator=g, device=device).to(dtype)
        cb = torch.randn(k, d, generator=g, device=device).to(dtype)
        got = vq_nearest(z, cb, metric=metric, backend=backend)
        ref = vq_nearest(z, cb, metric=metric, backend="torch")
        z64, c64 = z.double(), cb.double()
        if metric == "cosine":
            z64, c64 = F.normalize(z64, dim=1), F.normalize(c64, dim=1)
            score = lambda ids: -(z64 * c64[ids]).sum(1)  # noqa: E731
        else:
            score = lambda ids: ((z64 - c64[ids]) ** 2).sum(1)  # noqa: E731
        if got.shape != (n,) or got.dtype != torch.int64 or int(got.min()) < 0 or int(got.max()) >= k:
            raise AssertionError(f"ids out of range or wrong shape: {tuple(got.shape)} {got.dtype}")
        s_got, s_ref = score(got), score(ref)
        scale = 1 + s_ref.abs().max().item() + (z64.norm(dim=1).max() * c64.norm(dim=1).max()).item()
        err = max((s_got - s_ref).max().item(), 0.0) / scale
        return err, 1e-5, lambda: vq_nearest(z, cb, metric=metric, backend=backend)

    return Case("vq_nearest", metric, label, dtype, n * k * d, run)


def _vq_sample_case(n, k, d, label, seed) -> Case:
    def run(backend, device):
        g = torch.Generator(device=device).manual_seed(seed)  # the same inputs for every backend
        z = torch.randn(n, d, generator=g, device=device)
        cb = torch.randn(k, d, generator=g, device=device)

        def draw(be):
            gen = torch.Generator(device=device).manual_seed(7)
            return vq_sample(z, cb, temperature=0.05, generator=gen, backend=be)

        got, ref = draw(backend), draw("torch")
        if int(got.min()) < 0 or int(got.max()) >= k:
            raise AssertionError("sampled ids out of range")
        return (got != ref).float().mean().item(), 0.01, lambda: draw(backend)

    return Case("vq_sample", "T=0.05", label, torch.float32, n * k * d, run)


def _ce_case(n, k, d, dtype, label, seed) -> Case:
    def run(backend, device):
        g = torch.Generator(device=device).manual_seed(seed)  # the same inputs for every backend
        h = torch.randn(n, d, generator=g, device=device).to(dtype)
        cb = torch.randn(k, d, generator=g, device=device).to(dtype)
        t = torch.randint(0, k, (n,), generator=g, device=device)
        w = torch.linspace(0.5, 1.5, n, device=device)  # non-uniform upstream gradients

        def fwd_bwd(fn, dt):
            hh, cc = h.to(dt).requires_grad_(), cb.to(dt).requires_grad_()
            loss = fn(hh, cc)
            return [loss, *_grads(loss, (hh, cc), w.to(loss.dtype))]

        op = lambda be: lambda a, b: codebook_cross_entropy(a, b, t, temperature=0.5, reduction="none",  # noqa
                                                             backend=be)
        got, ref = fwd_bwd(op(backend), dtype), fwd_bwd(op("torch"), torch.float32)
        lowp = fwd_bwd(lambda a, b: F.cross_entropy((F.normalize(a, dim=1) @ F.normalize(b, dim=1).t() / 0.5)
                                                    .float(), t, reduction="none"), dtype)
        err, tol = _worst([_rule(name, o, r, lp) for name, o, r, lp in zip(("loss", "dh", "dc"), got, ref, lowp)])
        return err, tol, lambda: fwd_bwd(op(backend), dtype)

    return Case("codebook_cross_entropy", "fwd+bwd", label, dtype, 3 * n * k * d, run)


def _attention_case(b, h, lq, lk, d, dtype, label, seed, *, causal=False, rows=None, lens=None) -> Case:
    variant = "varlen" if lens else "q_rows" if rows else "dense"
    variant += " causal" if causal else ""

    def run(backend, device):
        g = torch.Generator(device=device).manual_seed(seed)  # the same inputs for every backend
        if lens:
            lq_, lk_ = sum(lens), sum(lens)
            cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
        else:
            lq_, lk_, cu = lq, lk, None
        q, k, v = (torch.randn(b, h, n, d, generator=g, device=device).to(dtype)
                   .requires_grad_() for n in (lq_, lk_, lk_))
        kw = dict(causal=causal, cu_seqlens=cu, max_seqlen=max(lens) if lens else None)
        sl = slice(*rows) if rows else slice(None)
        out = attention(q, k, v, q_rows=rows, backend=backend, **kw)
        dout = torch.randn(out.shape, generator=g, device=device).to(dtype)
        got = [out, *_grads(out, (q, k, v), dout)]
        refs = {}
        for upcast in (True, False):
            r = attention_ref(q, k, v, upcast=upcast, causal=causal, cu_seqlens=cu,
                              q_offset=0 if lens else lk_ - lq_)[:, :, sl]
            refs[upcast] = [r, *_grads(r, (q, k, v), dout)]
        err, tol = _worst([_rule(name, o, r, lp) for name, o, r, lp in
                           zip(("out", "dq", "dk", "dv"), got, refs[True], refs[False])])

        def call():
            o = attention(q, k, v, q_rows=rows, backend=backend, **kw)
            _grads(o, (q, k, v), dout)
        return err, tol, call

    n_q = sum(lens) if lens else lq
    return Case("attention", variant + " fwd+bwd", label, dtype, 3.5 * 4 * b * h * n_q * (n_q if lens else lk) * d,
                run)


def _vit_shapes(depth: int, d: int) -> list[tuple[int, ...]]:
    """Parameter shapes of `depth` ViT blocks (the shared encoder SACP runs on), in module order."""
    block = [(d,), (d,), (3 * d, d), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return [s for _ in range(depth) for s in block]


_AWKWARD_GRADS = [(1,), (3,), (7, 5), (65537,), (2, 3, 11), (127,), (1, 1), (13, 17)]


def _sacp_case(op, shapes, label, seed, per_tensor_groups) -> Case:
    def run(backend, device):
        g = torch.Generator(device=device).manual_seed(seed)  # the same inputs for every backend
        a, b = [], []
        for i, s in enumerate(shapes):
            x = torch.randn(s, generator=g, device=device)
            y = torch.randn(s, generator=g, device=device) - 0.3 * x
            a.append(None if i % 5 == 1 else x)
            b.append(None if i % 5 == 4 else y)
        groups = list(range(len(shapes))) if per_tensor_groups else None
        gids = groups or [0] * len(shapes)
        f64 = [[t.double().cpu() if t is not None else None for t in ts] for ts in (a, b)]
        if op == "gradient_gram":
            got = gradient_gram(a, b, groups=groups, backend=backend).double().cpu()
            ref = gradient_gram_ref(*f64, gids, max(gids) + 1)
            scale = torch.stack([(ref[:, 1] * ref[:, 2]).sqrt(), ref[:, 1], ref[:, 2]], 1) + 1e-6
            err = ((got - ref).abs() / scale).max().item()
            return err, 1e-5, lambda: gradient_gram(a, b, groups=groups, backend=backend)
        got = sacp_project(a, b, groups=groups, backend=backend)
        ref = sacp_project_ref(*f64, gids, max(gids) + 1)
        pairs = [_rule(f"out[{i}]", o.cpu(), r.float(), None) for i, (o, r) in enumerate(zip(got, ref))
                 if r is not None]
        return (*_worst(pairs), lambda: sacp_project(a, b, groups=groups, backend=backend))

    numel = sum(math.prod(s) for s in shapes)
    return Case(op, "per-tensor groups" if per_tensor_groups else "global", label, torch.float32, 6 * numel, run)


def cases(device: str) -> Iterator[Case]:
    """Every case run on ``device``: awkward shapes and the tiny preset everywhere, dera-l shapes on CUDA."""
    from .models.config import TokenizerConfig

    seeds = iter(range(1000, 2000))  # one seed per case: every backend of a case sees the same inputs

    tiny = TokenizerConfig.from_name("tiny")
    t_n, t_k, t_d = 2 * tiny.num_tokens, tiny.codebook_size, tiny.code_dim
    t_hd, t_len = tiny.dim // tiny.num_heads, tiny.num_patches + tiny.num_tokens
    t_streams = [tiny.num_frame_patches + tiny.num_appearance_tokens,
                 tiny.num_patches + tiny.num_motion_tokens]  # DeRA's two encoder streams
    t_vq = f"tiny-N{t_n}-K{t_k}-D{t_d}"
    half = torch.bfloat16 if device == "cuda" else torch.float16
    fp32 = torch.float32
    for metric in ("l2", "cosine"):
        for n, k, d, label in ((1, 1, 8, "N1-K1-D8"), (257, 1031, 33, "N257-K1031-D33"),
                               (1000, 509, 256, "N1000-K509-D256"), (t_n, t_k, t_d, t_vq)):
            yield _vq_nearest_case(n, k, d, metric, fp32, label, next(seeds))
    yield _vq_nearest_case(257, 1031, 16, "l2", half, "N257-K1031-D16", next(seeds))
    yield _vq_sample_case(500, 300, 16, "N500-K300-D16", next(seeds))
    yield _vq_sample_case(t_n, t_k, t_d, t_vq, next(seeds))
    yield _ce_case(67, 1031, 16, fp32, "N67-K1031-D16", next(seeds))
    yield _ce_case(t_n, t_k, t_d, fp32, t_vq, next(seeds))
    yield _attention_case(1, 2, 17, 17, 16, fp32, "B1H2-L17-D16", next(seeds), causal=True)
    yield _attention_case(1, 1, 33, 70, 32, fp32, "B1H1-Lq33-Lk70-D32", next(seeds), causal=True)
    yield _attention_case(1, 2, 40, 57, 64, fp32, "B1H2-Lq40-Lk57-D64-rows5:30", next(seeds), causal=True,
                          rows=(5, 30))
    yield _attention_case(1, 2, 0, 0, 32, fp32, "lens17+0+40+1-D32", next(seeds), causal=True, lens=[17, 0, 40, 1])
    yield _attention_case(2, tiny.num_heads, t_len, t_len, t_hd, fp32, f"tiny-B2H{tiny.num_heads}-L{t_len}-D{t_hd}",
                          next(seeds))
    yield _attention_case(1, tiny.num_heads, 0, 0, t_hd, fp32, "tiny-varlen-" + "+".join(map(str, t_streams * 2)),
                          next(seeds), lens=t_streams * 2)
    for op in ("gradient_gram", "sacp_project"):
        yield _sacp_case(op, _AWKWARD_GRADS, "awkward-8-tensors", next(seeds), per_tensor_groups=True)
        yield _sacp_case(op, _vit_shapes(tiny.encoder_depth, tiny.dim), "tiny-encoder", next(seeds),
                         per_tensor_groups=False)
    if device == "cuda":
        big = TokenizerConfig.from_name("dera-l")
        n, k, d = 8 * big.num_tokens, big.codebook_size, big.code_dim
        hd, length = big.dim // big.num_heads, big.num_patches + big.num_tokens
        streams = [big.num_frame_patches + big.num_appearance_tokens, big.num_patches + big.num_motion_tokens]
        label = f"dera-l-N{n}-K{k}-D{d}"
        yield _vq_nearest_case(n, k, d, "l2", fp32, label, next(seeds))
        yield _vq_sample_case(n, k, d, label, next(seeds))
        yield _ce_case(n, k, d, torch.bfloat16, label, next(seeds))
        yield _attention_case(2, big.num_heads, length, length, hd, torch.bfloat16,
                              f"dera-l-B2H{big.num_heads}-L{length}-D{hd}", next(seeds))
        yield _attention_case(1, big.num_heads, 0, 0, hd, torch.bfloat16,
                              "dera-l-varlen-" + "+".join(map(str, streams * 2)), next(seeds), lens=streams * 2)
        yield _sacp_case("sacp_project", _vit_shapes(big.encoder_depth, big.dim), "dera-l-encoder", next(seeds),
                         per_tensor_groups=False)


# ---------------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------------
def _time(call: Callable[[], object], device: str, reps: int = 3) -> float:
    """Best of ``reps`` calls after one warm-up, in ms."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    call()
    sync()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _skip_reason(case: Case, backend: str, device: str) -> str | None:
    why = backends.why_unavailable(backend, case.op, device)
    if why is None and backend == "triton" and device == "cpu":
        if case.dtype == torch.bfloat16:
            why = "the Triton interpreter computes bf16 dots wrongly; bf16 Triton runs on the GPU"
        elif case.work > INTERPRETER_MAX_WORK:
            why = "too slow for the Triton interpreter; runs on the GPU"
    return why


def run_case(case: Case, backend: str, device: str, bench: bool) -> Row:
    row = Row(case.op, case.variant, backend, device, case.shape, str(case.dtype).replace("torch.", ""), "skip")
    why = _skip_reason(case, backend, device)
    if why is not None:
        row.reason = why
        return row
    try:
        err, tol, call = case.run(backend, device)
    except backends.BackendUnavailableError as e:  # a per-shape limit (e.g. the CUDA kernels' head dims)
        row.reason = str(e).split(": ", 1)[-1]
        return row
    except Exception as e:  # noqa: BLE001 - a crashing backend is a failed row, not a crashed self-test
        row.status, row.reason = "fail", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        return row
    row.max_err, row.tol = err, tol
    row.status = "pass" if err <= tol else "fail"
    if bench:
        row.ms = _time(call, device)
        row.torch_ms = row.ms if backend == "torch" else _time(case.run("torch", device)[2], device)
    return row


def run(devices: list[str], bench: bool = False, progress: Callable[[Row], None] | None = None) -> list[Row]:
    """Every case on every backend of every device in ``devices``; ``progress`` sees each row as it is done."""
    rows = []
    for device in devices:
        for case in cases(device):
            for backend in DEVICE_BACKENDS[device]:
                torch.manual_seed(0)
                row = run_case(case, backend, device, bench)
                rows.append(row)
                if progress is not None:
                    progress(row)
    return rows


def format_table(rows: list[Row], bench: bool) -> str:
    head = ["op", "variant", "backend", "device", "shape", "dtype", "max err", "tol", "status"]
    if bench:
        head += ["ms", "torch ms", "speed-up"]
    lines = [head]
    for r in rows:
        cells = [r.op, r.variant, r.backend, r.device, r.shape, r.dtype,
                 "-" if r.max_err is None else f"{r.max_err:.2e}", "-" if r.tol is None else f"{r.tol:.1e}",
                 r.status.upper() if r.status == "fail" else r.status]
        if bench:
            cells += ["-" if r.ms is None else f"{r.ms:.3g}", "-" if r.torch_ms is None else f"{r.torch_ms:.3g}",
                      "-" if r.speedup is None else f"{r.speedup:.2f}x"]
        lines.append(cells)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    reasons = sorted({(r.backend, r.device, r.reason) for r in rows if r.status != "pass" and r.reason})
    if reasons:
        out += ["", "skipped / failed because:"]
        out += [f"  {b} on {d}: {why}" for b, d, why in reasons]
    return "\n".join(out)
