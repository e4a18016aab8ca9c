"""Triton FlashAttention-2 style attention: forward (optionally split-KV), backward without atomics.

Layouts (contiguous, last dim stride 1): dense q [B, H, Lq, D], k/v [B, H, Lk, D]; varlen q [1, H, Tq, D],
k/v [1, H, Tk, D] with int32 cu_seqlens_q/k [S+1]. Causal: key j is visible to query i iff j <= i + offset with
offset = q_offset (dense) or len_k(s) - len_q(s) (varlen). lse is fp32, natural log, -inf on rows with no visible
key (their output is 0). Any head dim <= 128 (padded to a power of two >= 16 with masks). Only plain pointer
arithmetic (no block pointers or tensor descriptors), so the same code runs on Triton 3.6 to 3.9.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# NOTE: constexpr module globals are visible to @triton.jit code (plain ones are not).
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E): exp2 is one MUFU op
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, keyed by the padded head dim bucket and the element size.
# NOTE: one config per case, no multi-config autotune: the autotuner needs a GPU and fails in the interpreter.
# GPU values: the Triton tutorial's H100 shapes, adjusted so that the sm_90 cubins (compiled here without a GPU and
# inspected with cuobjdump --dump-resource-usage) spill at most 8 bytes in the 16-bit configs; fp32 (exact
# "ieee" dots, not the performance path) spills a few hundred bytes at D=128. Untimed: the GPU bring-up re-tunes
# them with bench/bench_attention.py.
_GPU_BLOCKS = {
    ("fwd", 64, 2): (128, 64, 8, 3), ("fwd", 128, 2): (128, 64, 8, 3),
    ("fwd", 64, 4): (64, 32, 8, 2), ("fwd", 128, 4): (32, 16, 4, 1),
    ("dkdv", 64, 2): (32, 128, 8, 3), ("dkdv", 128, 2): (32, 64, 8, 2),
    ("dkdv", 64, 4): (16, 32, 4, 1), ("dkdv", 128, 4): (16, 32, 4, 1),
    ("dq", 64, 2): (128, 32, 4, 3), ("dq", 128, 2): (64, 32, 4, 2),
    ("dq", 64, 4): (32, 32, 4, 2), ("dq", 128, 4): (32, 16, 4, 1),
}
# The interpreter runs program instances one by one (~1 ms each): small blocks keep several blocks per test shape
# (so ragged tails, multi-block loops and causal block skipping are exercised) without many programs.
_CPU_BLOCK = (32, 32, 1, 1)
_CPU_SMS = 4  # pretend SM count on CPU, so that small test shapes take the split-KV path


def _blocks(kind: str, block_d: int, elem_size: int, device: torch.device):
    if device.type != "cuda":
        return _CPU_BLOCK
    return _GPU_BLOCKS[(kind, 64 if block_d <= 64 else 128, 4 if elem_size >= 4 else 2)]


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(n_programs: int, n_kblocks: int, device: torch.device) -> int:
    """Split the key range when the (batch, head, query-block) grid cannot fill the GPU (Flash-Decoding)."""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else _CPU_SMS
    if n_programs >= sms:
        return 1
    # two waves' worth of programs, each split keeping >= 2 key blocks so the merge stays cheap
    return max(1, min(triton.cdiv(2 * sms, n_programs), n_kblocks // 2, 32))


@triton.jit
def _seq_bounds(CU_Q, CU_K, b, len_q_dense, len_k_dense, q_offset, VARLEN: tl.constexpr):
    """(batch index, first q row, len_q, first k row, len_k, causal offset) of sequence b."""
    if VARLEN:
        q_start = tl.load(CU_Q + b)
        k_start = tl.load(CU_K + b)
        len_q = tl.load(CU_Q + b + 1) - q_start
        len_k = tl.load(CU_K + b + 1) - k_start
        return 0, q_start, len_q, k_start, len_k, len_k - len_q
    return b, 0, len_q_dense, 0, len_k_dense, q_offset


@triton.jit
def _attention_fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K,
                          sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_m, sl_b, sl_h,
                          split_o, split_l, H, len_q_dense, len_k_dense, head_dim, scale, q_offset, blocks_per_split,
                          VARLEN: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m, bh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    bi, q_start, len_q, k_start, len_k, offset = _seq_bounds(CU_Q, CU_K, b, len_q_dense, len_k_dense, q_offset,
                                                             VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= len_q:
        return
    # NOTE: fold log2(e) into the scale so the softmax uses exp2 (one MUFU op) instead of exp.
    qk_scale = tl.cast(scale, tl.float32) * LOG2E
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < len_q
    d_ok = offs_d < head_dim
    q = tl.load(Q + bi * sq_b + h * sq_h + (q_start + offs_m)[:, None] * sq_m + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + bi * sk_b + h * sk_h + k_start * sk_n
    v_base = V + bi * sv_b + h * sv_h + k_start * sv_n

    hi = len_k
    if CAUSAL:  # keys past the block's last row + offset are invisible to every row of the block
        hi = tl.maximum(tl.minimum(len_k, start_m + BLOCK_M + offset), 0)
    blk_lo = split * blocks_per_split
    blk_hi = tl.minimum(blk_lo + blocks_per_split, (hi + BLOCK_N - 1) // BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(blk_lo * BLOCK_N, blk_hi * BLOCK_N, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < len_k
        kt = tl.load(k_base + offs_n[None, :] * sk_n + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None],
                     other=0.0)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale  # [BLOCK_M, BLOCK_N], log2 domain
        ok = n_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None] + offset)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # NOTE: a row with no visible key so far has m = -inf; subtract 0 instead so exp2 never sees -inf + inf.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * sv_n + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0)  # [BLOCK_N, BLOCK_D]
        acc = tl.dot(p.to(v.dtype), v, acc=acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new

    empty = l_i == 0.0
    l_div = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_div)) * LN2)  # natural log
    out = acc / l_div[:, None]
    o_ptr = O + split * split_o + bi * so_b + h * so_h + (q_start + offs_m)[:, None] * so_m + offs_d[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + split * split_l + bi * sl_b + h * sl_h + q_start + offs_m, lse, mask=m_ok)


@triton.jit
def _attention_merge_kernel(OP, LSEP, O, LSE, R, head_dim, num_splits, BLOCK_R: tl.constexpr,
                            BLOCK_D: tl.constexpr):
    """Combine split partials: lse = log sum_s exp(lse_s), O = sum_s exp(lse_s - lse) O_s (rows with no key: 0)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    r_ok = rows < R
    mask = r_ok[:, None] & (offs_d < head_dim)[None, :]
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for s in range(num_splits):
        m = tl.maximum(m, tl.load(LSEP + s * R + rows, mask=r_ok, other=float("-inf")))
    m_sub = tl.where(m == float("-inf"), 0.0, m)
    l = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for s in range(num_splits):
        w = tl.exp(tl.load(LSEP + s * R + rows, mask=r_ok, other=float("-inf")) - m_sub)
        l += w
        acc += w[:, None] * tl.load(OP + s * R * head_dim + rows[:, None] * head_dim + offs_d[None, :], mask=mask,
                                    other=0.0)
    empty = l == 0.0
    l_div = tl.where(empty, 1.0, l)
    tl.store(O + rows[:, None] * head_dim + offs_d[None, :], (acc / l_div[:, None]).to(O.dtype.element_ty),
             mask=mask)
    tl.store(LSE + rows, tl.where(empty, float("-inf"), m_sub + tl.log(l_div)), mask=r_ok)


@triton.jit
def _attention_bwd_preprocess_kernel(O, DO, DELTA, R, head_dim, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[r] = sum_d O[r, d] * dO[r, d] in fp32 (rows of the contiguous [.., L, D] tensors)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (offs_d < head_dim)[None, :]
    ptr = rows[:, None] * head_dim + offs_d[None, :]
    o = tl.load(O + ptr, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + ptr, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, 1), mask=rows < R)


@triton.jit
def _load_lse2(ptr, m_ok):
    """Row lse in the log2 domain, [BLOCK_M]. NOTE: rows with no visible key (lse = -inf) get +inf so that
    exp2(s - lse) = 0 there."""
    lse = tl.load(ptr, mask=m_ok, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _p_and_ds(q, k, v, do, lse2, delta, offs_m, offs_n, m_ok, n_ok, offset, qk_scale, CAUSAL: tl.constexpr,
              DOT_PREC: tl.constexpr):
    """One (query block, key block) tile of the backward: P = exp(S - lse) recomputed, and dS = P * (dP - delta),
    both fp32 [BLOCK_M, BLOCK_N], zero where a key is invisible (padding, causal mask)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # log2 domain
    ok = m_ok[:, None] & n_ok[None, :]
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + offset)
    p = tl.where(ok, tl.math.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    return p, p * (dp - delta[:, None])


@triton.jit
def _attention_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
                               sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sl_b, sl_h,
                               H, len_q_dense, len_k_dense, head_dim, scale, q_offset,
                               VARLEN: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """dK, dV of one key block, looping over the query blocks that can see it (q/dO share q's strides, k/v/dK/dV
    share k's)."""
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    bi, q_start, len_q, k_start, len_k, offset = _seq_bounds(CU_Q, CU_K, b, len_q_dense, len_k_dense, q_offset,
                                                             VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= len_k:
        return
    qk_scale = tl.cast(scale, tl.float32) * LOG2E
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < len_k
    d_ok = offs_d < head_dim
    kv_off = bi * sk_b + h * sk_h + (k_start + offs_n)[:, None] * sk_n + offs_d[None, :]
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    q_base = bi * sq_b + h * sq_h + q_start * sq_m
    l_base = bi * sl_b + h * sl_h + q_start
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:  # query rows i < start_n - offset see none of this block's keys
        lo = (tl.maximum(start_n - offset, 0) // BLOCK_M) * BLOCK_M
    for start_m in range(lo, len_q, BLOCK_M):
        offs_m = start_m + offs_m0
        m_ok = offs_m < len_q
        qd_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + q_base + offs_m[:, None] * sq_m + offs_d[None, :], mask=qd_mask, other=0.0)
        do = tl.load(DO + q_base + offs_m[:, None] * sq_m + offs_d[None, :], mask=qd_mask, other=0.0)
        lse2 = _load_lse2(LSE + l_base + offs_m, m_ok)
        delta = tl.load(DELTA + l_base + offs_m, mask=m_ok, other=0.0)
        p, ds = _p_and_ds(q, k, v, do, lse2, delta, offs_m, offs_n, m_ok, n_ok, offset, qk_scale, CAUSAL, DOT_PREC)
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, acc=dv, input_precision=DOT_PREC)
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, acc=dk, input_precision=DOT_PREC)
    dk = dk * tl.cast(scale, tl.float32)
    tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attention_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
                             sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sl_b, sl_h,
                             H, len_q_dense, len_k_dense, head_dim, scale, q_offset,
                             VARLEN: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """dQ of one query block, looping over the visible key blocks (recomputes P: no atomics, deterministic)."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    bi, q_start, len_q, k_start, len_k, offset = _seq_bounds(CU_Q, CU_K, b, len_q_dense, len_k_dense, q_offset,
                                                             VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= len_q:
        return
    qk_scale = tl.cast(scale, tl.float32) * LOG2E
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < len_q
    d_ok = offs_d < head_dim
    q_off = bi * sq_b + h * sq_h + (q_start + offs_m)[:, None] * sq_m + offs_d[None, :]
    qd_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + q_off, mask=qd_mask, other=0.0)
    do = tl.load(DO + q_off, mask=qd_mask, other=0.0)
    l_off = bi * sl_b + h * sl_h + q_start + offs_m
    lse2 = _load_lse2(LSE + l_off, m_ok)
    delta = tl.load(DELTA + l_off, mask=m_ok, other=0.0)
    k_base = bi * sk_b + h * sk_h + k_start * sk_n
    hi = len_k
    if CAUSAL:
        hi = tl.maximum(tl.minimum(len_k, start_m + BLOCK_M + offset), 0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < len_k
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + k_base + offs_n[:, None] * sk_n + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + k_base + offs_n[:, None] * sk_n + offs_d[None, :], mask=kv_mask, other=0.0)
        _, ds = _p_and_ds(q, k, v, do, lse2, delta, offs_m, offs_n, m_ok, n_ok, offset, qk_scale, CAUSAL, DOT_PREC)
        dq = tl.dot(ds.to(k.dtype), k, acc=dq, input_precision=DOT_PREC)
    dq = dq * tl.cast(scale, tl.float32)
    tl.store(DQ + q_off, dq.to(DQ.dtype.element_ty), mask=qd_mask)


def _common(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    """(number of sequences, padded head dim, dot precision, varlen flag, max lengths)."""
    varlen = cu_seqlens_q is not None
    n_seq = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    block_d = max(16, triton.next_power_of_2(q.shape[-1]))
    # NOTE: fp32 inputs use exact fp32 dots; the GPU default would be TF32 (10-bit mantissa).
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    max_q = max_seqlen_q if varlen else q.shape[2]
    max_k = max_seqlen_k if varlen else k.shape[2]
    return n_seq, block_d, prec, varlen, max_q, max_k


def attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, q_offset,
                  num_splits=None):
    """Forward. Contiguous q [B, H, Lq, D], k/v [B, H, Lk, D] (varlen: [1, H, T, D] + cu_seqlens).

    Returns (out like q, lse fp32 [B, H, Lq]). ``num_splits`` None picks the split-KV count by occupancy.
    """
    n_seq, block_d, prec, varlen, max_q, max_k = _common(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    B, H, Lq, D = q.shape
    bm, bn, warps, stages = _blocks("fwd", block_d, q.element_size(), q.device)
    if max_q < bm:  # few query rows (cross-attention, decoding): do not pad the query block beyond them
        bm = max(16, triton.next_power_of_2(max_q))
        warps = 4 if bm == 16 else warps
    n_mblocks, n_kblocks = triton.cdiv(max_q, bm), triton.cdiv(max_k, bn)
    if num_splits is None:
        num_splits = _num_splits(n_mblocks * n_seq * H, n_kblocks, q.device)
    num_splits = max(1, min(num_splits, n_kblocks))
    per_split = triton.cdiv(n_kblocks, num_splits)
    num_splits = triton.cdiv(n_kblocks, per_split)  # drop splits that would own no key block
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)
    if num_splits > 1:  # fp32 partials per split, merged below
        o_buf = torch.empty((num_splits, *q.shape), device=q.device, dtype=torch.float32)
        l_buf = torch.empty((num_splits, *lse.shape), device=q.device, dtype=torch.float32)
    else:
        o_buf, l_buf = out, lse
    _attention_fwd_kernel[(n_mblocks, n_seq * H, num_splits)](
        q, k, v, o_buf, l_buf, cu_seqlens_q, cu_seqlens_k,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), out.numel(), lse.numel(), H, Lq, k.shape[2], D, float(scale),
        int(q_offset), per_split, VARLEN=varlen, CAUSAL=bool(causal), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d,
        DOT_PREC=prec, num_warps=warps, num_stages=stages)
    if num_splits > 1:
        rows = lse.numel()
        block_r = 64 if q.is_cuda else 256
        _attention_merge_kernel[(triton.cdiv(rows, block_r),)](o_buf, l_buf, out, lse, rows, D, num_splits,
                                                              BLOCK_R=block_r, BLOCK_D=block_d)
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
                  q_offset):
    """Backward: returns (dq, dk, dv) like q, k, v. Tensors contiguous as in :func:`attention_fwd`."""
    n_seq, block_d, prec, varlen, max_q, max_k = _common(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    B, H, Lq, D = q.shape
    dout = dout.contiguous()
    delta = torch.empty_like(lse)
    rows = lse.numel()
    block_r = 64 if q.is_cuda else 256
    _attention_bwd_preprocess_kernel[(triton.cdiv(rows, block_r),)](out, dout, delta, rows, D, BLOCK_R=block_r,
                                                                   BLOCK_D=block_d)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    args = (cu_seqlens_q, cu_seqlens_k, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
            k.stride(2), lse.stride(0), lse.stride(1), H, Lq, k.shape[2], D, float(scale), int(q_offset))
    flags = dict(VARLEN=varlen, CAUSAL=bool(causal), BLOCK_D=block_d, DOT_PREC=prec)
    bm, bn, warps, stages = _blocks("dkdv", block_d, q.element_size(), q.device)
    _attention_bwd_dkdv_kernel[(triton.cdiv(max_k, bn), n_seq * H)](
        q, k, v, dout, lse, delta, dk, dv, *args, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
        **flags)
    bm, bn, warps, stages = _blocks("dq", block_d, q.element_size(), q.device)
    _attention_bwd_dq_kernel[(triton.cdiv(max_q, bm), n_seq * H)](
        q, k, v, dout, lse, delta, dq, *args, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **flags)
    return dq, dk, dv
