"""Triton kernels for the VQ op family (installed as dera_fast.kernels.vq).

Every kernel gives one program a tile of BLOCK_N rows and streams the codebook through it in BLOCK_K-code tiles,
so the N x K score matrix never exists. Scores are fp32 whatever the input dtype: inputs are upcast on load and
the dot runs in fp32 (tf32x3 on tensor cores by default: three TF32 products recover fp32 accuracy, and at small D
the kernel is bound by its epilogue, not the dot, so the extra products are nearly free).

The launchers take contiguous tensors, allocate outputs and launch; validation lives in dera_fast/ops/vq.py.
"""
import triton
import triton.language as tl

import torch

INPUT_PRECISION = "tf32x3"
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E): exp2 is one MUFU op
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


def _blocks(D: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, BLOCK_D, num_warps) for code width D: one D tile per program.

    NOTE: not measured on a GPU yet (bench/gpu_bringup.sh runs bench/bench_vq.py to re-tune them); what fixes them
    today are constraints: tl.dot needs inner dims >= 16 (BLOCK_D >= 16, a power of two >= D); the fp32 score tile
    BLOCK_N x BLOCK_K (32 KiB at 64 x 128) plus the z tile BLOCK_N x BLOCK_D and the codebook tile BLOCK_D x BLOCK_K
    must fit the registers / shared memory of 4 warps, so BLOCK_K halves at D > 32 and BLOCK_N at D > 128; every
    config compiles for sm_90 within 227 KiB of shared memory (tests/test_triton_aot.py). On the CPU interpreter
    the tile size only trades Python overhead per program against per-op numpy cost.
    """
    block_d = max(16, triton.next_power_of_2(D))  # tl.dot needs an inner dim >= 16
    if block_d <= 32:
        return 64, 128, block_d, 4
    if block_d <= 128:
        return 64, 64, block_d, 4
    return 32, 64, block_d, 4


@triton.jit
def _load_rows(ptr, rows, N, D, dims):
    """Rows ``rows`` of a row-major [N, D] matrix as fp32 [BLOCK_N, BLOCK_D] (zeros past N and D)."""
    return tl.load(ptr + rows[:, None] * D + dims[None, :], mask=(rows[:, None] < N) & (dims[None, :] < D),
                   other=0.0).to(tl.float32)


@triton.jit
def _load_codes_t(cb_ptr, k0, K, D, dims, BLOCK_K: tl.constexpr):
    """Codes k0 .. k0 + BLOCK_K of the [K, D] codebook, transposed to [BLOCK_D, BLOCK_K] for ``tl.dot(z, c)`` (zeros
    past K and D, so padding codes score 0 and must be masked by the caller). Returns (code ids, tile)."""
    codes = k0 + tl.arange(0, BLOCK_K)
    c = tl.load(cb_ptr + codes[None, :] * D + dims[:, None], mask=(codes[None, :] < K) & (dims[:, None] < D),
                other=0.0)
    return codes, c


@triton.jit
def _row_tile(ptr, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's BLOCK_N rows of a row-major [N, D] input: (row ids, dim ids, fp32 tile [BLOCK_N, BLOCK_D])."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    return rows, dims, _load_rows(ptr, rows, N, D, dims)


@triton.jit
def _online_lse(m, s, logit):
    """One tile of a streaming base-2 log-sum-exp: the running row max ``m`` and sum ``s`` = sum 2^(l - m), [BLOCK_N]
    each, updated with the logits ``logit`` [BLOCK_N, BLOCK_K] (padding codes at -inf)."""
    m_new = tl.maximum(m, tl.max(logit, axis=1))
    return m_new, s * tl.exp2(m - m_new) + tl.sum(tl.exp2(logit - m_new[:, None]), axis=1)


@triton.jit
def _ce_row_terms(rows, row_ok, g_ptr, t_ptr, lse_ptr, inv_t):
    """The per-row terms of the cross-entropy backward: (target id, lse, g_n / T), [BLOCK_N] each."""
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=0).to(tl.int32)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    return tgt, lse, tl.load(g_ptr + rows, mask=row_ok, other=0.0) * tl.cast(inv_t, tl.float32)


@triton.jit
def _ce_dlogits(h, c, codes, code_ok, tgt, lse, coef, inv_t, PRECISION: tl.constexpr):
    """d loss / d logits of one tile, (p_nk - 1[k = t_n]) * g_n / T as [BLOCK_N, BLOCK_K]; zero on padding codes,
    and on padding rows through their zero ``coef``."""
    logit = tl.dot(h, c, input_precision=PRECISION) * tl.cast(inv_t, tl.float32)
    p = tl.where(code_ok[None, :], tl.exp(logit - lse[:, None]), 0.0)
    return (p - tl.where(codes[None, :] == tgt[:, None], 1.0, 0.0)) * coef[:, None]


# ---------------------------------------------------------------------------------------------------------------
# vq_nearest: argmin_k (bias_k - 2 z.c_k)
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _vq_nearest_fwd_kernel(z_ptr, cb_ptr, bias_ptr, out_ptr, N, K, D,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                           PRECISION: tl.constexpr):
    rows, dims, z = _row_tile(z_ptr, N, D, BLOCK_N, BLOCK_D)
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_N], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        codes, c = _load_codes_t(cb_ptr, k0, K, D, dims, BLOCK_K)  # [BLOCK_D, BLOCK_K]
        bias = tl.load(bias_ptr + codes, mask=codes < K, other=float("inf"))  # padding codes never win
        score = bias[None, :] - 2.0 * tl.dot(z, c, input_precision=PRECISION)
        tile_min, tile_idx = tl.min(score, axis=1, return_indices=True)  # leftmost index on ties
        # strict < keeps the earlier tile on ties: first-index tie-break across tiles too
        better = tile_min < best
        best_idx = tl.where(better, k0 + tile_idx, best_idx)
        best = tl.where(better, tile_min, best)
    tl.store(out_ptr + rows, best_idx.to(tl.int64), mask=rows < N)


def vq_nearest_fwd(z: torch.Tensor, codebook: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """z [N, D] any float dtype, codebook [K, D] fp32, bias [K] fp32 -> int64 [N]."""
    N, D = z.shape
    K = codebook.shape[0]
    out = torch.empty(N, dtype=torch.long, device=z.device)
    BN, BK, BD, warps = _blocks(D)
    _vq_nearest_fwd_kernel[(triton.cdiv(N, BN),)](z, codebook, bias, out, N, K, D, BLOCK_N=BN, BLOCK_K=BK,
                                                   BLOCK_D=BD, PRECISION=INPUT_PRECISION, num_warps=warps)
    return out


# ---------------------------------------------------------------------------------------------------------------
# vq_sample: inverse CDF of softmax_k(cos(z, c_k) / T) at u, in two passes over the codebook
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _vq_sample_fwd_kernel(z_ptr, cb_ptr, u_ptr, out_ptr, N, K, D, inv_t,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                          PRECISION: tl.constexpr):
    rows, dims, z = _row_tile(z_ptr, N, D, BLOCK_N, BLOCK_D)
    # fold 1/|z|, 1/T and log2(e) into one per-row scale so both passes use exp2 on the raw dot
    norm = tl.maximum(tl.sqrt(tl.sum(z * z, axis=1)), 1e-12)
    scale = tl.cast(inv_t, tl.float32) * LOG2E / norm
    # pass 1: row max m and normaliser s = sum_k 2^(l_k - m) (online rescaling)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        codes, c = _load_codes_t(cb_ptr, k0, K, D, dims, BLOCK_K)
        logit = tl.dot(z, c, input_precision=PRECISION) * scale[:, None]
        m, s = _online_lse(m, s, tl.where(codes[None, :] < K, logit, float("-inf")))
    # pass 2: running CDF with the final max; first code whose CDF exceeds u * s
    target = tl.load(u_ptr + rows, mask=rows < N, other=0.0) * s
    run = tl.zeros([BLOCK_N], tl.float32)
    pick = tl.full([BLOCK_N], -1, tl.int32)
    last_pos = tl.zeros([BLOCK_N], tl.int32)  # fallback when rounding keeps the CDF below the target
    for k0 in range(0, K, BLOCK_K):
        codes, c = _load_codes_t(cb_ptr, k0, K, D, dims, BLOCK_K)
        logit = tl.dot(z, c, input_precision=PRECISION) * scale[:, None]
        p = tl.where(codes[None, :] < K, tl.exp2(logit - m[:, None]), 0.0)
        cdf = run[:, None] + tl.cumsum(p, axis=1)
        hit = tl.min(tl.where(cdf > target[:, None], codes[None, :], 2147483647), axis=1)
        pick = tl.where((pick < 0) & (hit < 2147483647), hit, pick)
        last_pos = tl.maximum(last_pos, tl.max(tl.where(p > 0, codes[None, :], 0), axis=1))
        run = run + tl.sum(p, axis=1)
    pick = tl.where(pick < 0, last_pos, pick)
    tl.store(out_ptr + rows, pick.to(tl.int64), mask=rows < N)


def vq_sample_fwd(z: torch.Tensor, codebook: torch.Tensor, u: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """z [N, D] any float dtype, codebook [K, D] fp32 normalised, u [N] fp32 -> int64 [N]."""
    N, D = z.shape
    K = codebook.shape[0]
    out = torch.empty(N, dtype=torch.long, device=z.device)
    BN, BK, BD, warps = _blocks(D)
    _vq_sample_fwd_kernel[(triton.cdiv(N, BN),)](z, codebook, u, out, N, K, D, inv_temperature, BLOCK_N=BN,
                                                  BLOCK_K=BK, BLOCK_D=BD, PRECISION=INPUT_PRECISION,
                                                  num_warps=warps)
    return out


# ---------------------------------------------------------------------------------------------------------------
# codebook cross-entropy: loss_n = lse_n - l_{n, t_n}, l = <h, c> / T; backward without the N x K logits
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _codebook_ce_fwd_kernel(h_ptr, cb_ptr, t_ptr, loss_ptr, lse_ptr, N, K, D, inv_t,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                            PRECISION: tl.constexpr):
    rows, dims, h = _row_tile(h_ptr, N, D, BLOCK_N, BLOCK_D)
    tgt = tl.load(t_ptr + rows, mask=rows < N, other=0).to(tl.int32)
    scale = tl.cast(inv_t, tl.float32) * LOG2E
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    picked = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        codes, c = _load_codes_t(cb_ptr, k0, K, D, dims, BLOCK_K)
        logit2 = tl.dot(h, c.to(tl.float32), input_precision=PRECISION) * scale  # base-2 logits
        logit2 = tl.where(codes[None, :] < K, logit2, float("-inf"))
        picked += tl.sum(tl.where(codes[None, :] == tgt[:, None], logit2, 0.0), axis=1)
        m, s = _online_lse(m, s, logit2)
    lse = (m + tl.log2(s)) * LN2
    tl.store(lse_ptr + rows, lse, mask=rows < N)
    tl.store(loss_ptr + rows, lse - picked * LN2, mask=rows < N)


@triton.jit
def _codebook_ce_bwd_dh_kernel(g_ptr, h_ptr, cb_ptr, t_ptr, lse_ptr, dh_ptr, N, K, D, inv_t,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                               PRECISION: tl.constexpr):
    # dh_n = sum_k (p_nk - 1[k = t_n]) * g_n / T * c_k
    rows, dims, h = _row_tile(h_ptr, N, D, BLOCK_N, BLOCK_D)
    rmask = rows < N
    tgt, lse, coef = _ce_row_terms(rows, rmask, g_ptr, t_ptr, lse_ptr, inv_t)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        codes, c = _load_codes_t(cb_ptr, k0, K, D, dims, BLOCK_K)
        c = c.to(tl.float32)  # [BLOCK_D, BLOCK_K]
        dl = _ce_dlogits(h, c, codes, codes < K, tgt, lse, coef, inv_t, PRECISION)
        acc += tl.dot(dl, tl.trans(c), input_precision=PRECISION)
    tl.store(dh_ptr + rows[:, None] * D + dims[None, :], acc, mask=rmask[:, None] & (dims[None, :] < D))


@triton.jit
def _codebook_ce_bwd_dc_kernel(g_ptr, h_ptr, cb_ptr, t_ptr, lse_ptr, dc_ptr, N, K, D, inv_t,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                               PRECISION: tl.constexpr):
    # dc_k = sum_n (p_nk - 1[k = t_n]) * g_n / T * h_n: one program per code tile, rows streamed in order
    pid = tl.program_id(0)
    dims = tl.arange(0, BLOCK_D)
    codes, c = _load_codes_t(cb_ptr, pid * BLOCK_K, K, D, dims, BLOCK_K)
    c = c.to(tl.float32)  # [BLOCK_D, BLOCK_K]
    kmask = codes < K
    acc = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        rmask = rows < N
        h = _load_rows(h_ptr, rows, N, D, dims)
        tgt, lse, coef = _ce_row_terms(rows, rmask, g_ptr, t_ptr, lse_ptr, inv_t)
        dl = _ce_dlogits(h, c, codes, kmask, tgt, lse, coef, inv_t, PRECISION)  # [BLOCK_N, BLOCK_K]
        acc += tl.dot(tl.trans(dl), h, input_precision=PRECISION)
    tl.store(dc_ptr + codes[:, None] * D + dims[None, :], acc, mask=kmask[:, None] & (dims[None, :] < D))


def codebook_ce_fwd(h: torch.Tensor, codebook: torch.Tensor, target: torch.Tensor,
                    inv_temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """h [N, D], codebook [K, D] (unit rows, same dtype), target int64 [N] -> (loss [N], lse [N]) fp32."""
    N, D = h.shape
    K = codebook.shape[0]
    loss = torch.empty(N, dtype=torch.float32, device=h.device)
    lse = torch.empty(N, dtype=torch.float32, device=h.device)
    BN, BK, BD, warps = _blocks(D)
    _codebook_ce_fwd_kernel[(triton.cdiv(N, BN),)](h, codebook, target, loss, lse, N, K, D, inv_temperature,
                                                    BLOCK_N=BN, BLOCK_K=BK, BLOCK_D=BD,
                                                    PRECISION=INPUT_PRECISION, num_warps=warps)
    return loss, lse


def codebook_ce_bwd(grad_loss: torch.Tensor, h: torch.Tensor, codebook: torch.Tensor, target: torch.Tensor,
                    lse: torch.Tensor, inv_temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_loss [N] fp32 -> (grad_h [N, D], grad_codebook [K, D]) fp32. Two kernels, no atomics."""
    N, D = h.shape
    K = codebook.shape[0]
    dh = torch.empty(N, D, dtype=torch.float32, device=h.device)
    dc = torch.empty(K, D, dtype=torch.float32, device=h.device)
    BN, BK, BD, warps = _blocks(D)
    args = (grad_loss, h, codebook, target, lse)
    _codebook_ce_bwd_dh_kernel[(triton.cdiv(N, BN),)](*args, dh, N, K, D, inv_temperature, BLOCK_N=BN,
                                                       BLOCK_K=BK, BLOCK_D=BD, PRECISION=INPUT_PRECISION,
                                                       num_warps=warps)
    _codebook_ce_bwd_dc_kernel[(triton.cdiv(K, BK),)](*args, dc, N, K, D, inv_temperature, BLOCK_N=BN,
                                                       BLOCK_K=BK, BLOCK_D=BD, PRECISION=INPUT_PRECISION,
                                                       num_warps=warps)
    return dh, dc
