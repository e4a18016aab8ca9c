"""Multi-tensor SACP / two-task PCGrad kernels: a per-group Gram pass and a weighted-combine pass.

Both passes take the gradient tensors through a device-side *tensor table* (one int64 row per tensor: raw
addresses, numel, group) and a *chunk table* (one row per CHUNK-element piece of a tensor), so one launch covers
hundreds of tensors of any shape without copying them into a flat buffer (apex ``multi_tensor_apply``, with the
metadata in device memory instead of kernel arguments).

  pass 1  ``_gram_partials_kernel``: program = chunk; writes fp32 (dot, |a|^2, |b|^2) to partials[slot].
          Slots are numbered group by group, so each group owns a contiguous range of slots.
  reduce  ``_gram_reduce_kernel``: program = group; sums its slot range in a fixed order. Deterministic: no
          atomics, and the result depends only on the tensor list and CHUNK.
  pass 2  ``_combine_kernel``: program = chunk; out = w_a[g] * a + w_b[g] * b (+ out when accumulating).

A missing (None) gradient has address 0; a uniform runtime branch then skips its loads, so it reads as zeros and
is never allocated. Full BLOCKs are loaded without masks (16-byte vector loads when every address is aligned),
only the tail of each chunk is masked.
Tensors of different dtypes are split into one launch per dtype combination (the pointer element type is a
compile-time constant); all launches write into the same slot numbering.

NOTE (Triton interpreter, TRITON_INTERPRET=1): the interpreter represents pointers as raw host addresses, so it
does follow the int64 addresses loaded from the table for *CPU* tensors: the CPU CI checks the table layout,
chunking, masking of None gradients, the ordered reduction and the combine arithmetic. It cannot check GPU code
generation (the int64 -> pointer cast in PTX, alignment hints and vectorised loads, num_warps) nor bf16.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

CHUNK = 65536  # elements per program (apex/PyTorch kChunkSize)
_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _load_f32(ptr, idx, n, present, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    """BLOCK values of one gradient as fp32; zeros for a None gradient (``present`` false: nothing is read)."""
    if present:
        if MASKED:
            x = tl.load(ptr + idx, mask=idx < n, other=0.0).to(tl.float32)
        else:  # NOTE: unmasked full blocks let the GPU compiler emit 16-byte vector loads
            x = tl.load(ptr + idx).to(tl.float32)
    else:
        x = tl.zeros([BLOCK], dtype=tl.float32)
    return x


@triton.jit
def _gram_partials_kernel(tensors, chunks, partials, A_DT: tl.constexpr, B_DT: tl.constexpr, CHUNK: tl.constexpr,
                          BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    # chunks: [C, 3] int64 (tensor row, start element, slot); tensors: [T, 5] int64 (a, b, out, numel, group)
    pid = tl.program_id(0)
    t = tl.load(chunks + 3 * pid)
    start = tl.load(chunks + 3 * pid + 1)
    slot = tl.load(chunks + 3 * pid + 2)
    a_addr = tl.load(tensors + 5 * t)
    b_addr = tl.load(tensors + 5 * t + 1)
    numel = tl.load(tensors + 5 * t + 3)
    n = tl.minimum(numel - start, CHUNK)
    has_a = a_addr != 0  # a None gradient has address 0: nothing is loaded
    has_b = b_addr != 0
    a_ptr = a_addr.to(tl.pointer_type(A_DT)) + start
    b_ptr = b_addr.to(tl.pointer_type(B_DT)) + start
    if ALIGNED:  # every address and CHUNK are 16-byte aligned
        a_ptr = tl.multiple_of(a_ptr, 16)
        b_ptr = tl.multiple_of(b_ptr, 16)
    acc_ab = tl.zeros([BLOCK], dtype=tl.float32)
    acc_aa = tl.zeros([BLOCK], dtype=tl.float32)
    acc_bb = tl.zeros([BLOCK], dtype=tl.float32)
    offs = tl.arange(0, BLOCK)
    n_full = n - n % BLOCK
    for off in range(0, n_full, BLOCK):
        a = _load_f32(a_ptr, off + offs, n, has_a, False, BLOCK)
        b = _load_f32(b_ptr, off + offs, n, has_b, False, BLOCK)
        acc_ab += a * b
        acc_aa += a * a
        acc_bb += b * b
    a = _load_f32(a_ptr, n_full + offs, n, has_a, True, BLOCK)  # the tail (may be empty)
    b = _load_f32(b_ptr, n_full + offs, n, has_b, True, BLOCK)
    acc_ab += a * b
    acc_aa += a * a
    acc_bb += b * b
    tl.store(partials + 3 * slot, tl.sum(acc_ab, 0))
    tl.store(partials + 3 * slot + 1, tl.sum(acc_aa, 0))
    tl.store(partials + 3 * slot + 2, tl.sum(acc_bb, 0))


@triton.jit
def _gram_reduce_kernel(partials, seg, gram, BLOCK: tl.constexpr):
    # seg: [G + 1] int64 slot offsets; gram: [G, 3] fp32
    g = tl.program_id(0)
    lo = tl.load(seg + g)
    hi = tl.load(seg + g + 1)
    offs = tl.arange(0, BLOCK)
    acc0 = tl.zeros([BLOCK], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(lo, hi, BLOCK):
        rows = s + offs
        m = rows < hi
        acc0 += tl.load(partials + 3 * rows, mask=m, other=0.0)
        acc1 += tl.load(partials + 3 * rows + 1, mask=m, other=0.0)
        acc2 += tl.load(partials + 3 * rows + 2, mask=m, other=0.0)
    tl.store(gram + 3 * g, tl.sum(acc0, 0))
    tl.store(gram + 3 * g + 1, tl.sum(acc1, 0))
    tl.store(gram + 3 * g + 2, tl.sum(acc2, 0))


@triton.jit
def _combine_kernel(tensors, chunks, weights, A_DT: tl.constexpr, B_DT: tl.constexpr, O_DT: tl.constexpr,
                    CHUNK: tl.constexpr, BLOCK: tl.constexpr, ACCUMULATE: tl.constexpr, ALIGNED: tl.constexpr):
    # weights: [G, 2] fp32 (w_a, w_b) per group
    pid = tl.program_id(0)
    t = tl.load(chunks + 3 * pid)
    start = tl.load(chunks + 3 * pid + 1)
    a_addr = tl.load(tensors + 5 * t)
    b_addr = tl.load(tensors + 5 * t + 1)
    o_addr = tl.load(tensors + 5 * t + 2)
    numel = tl.load(tensors + 5 * t + 3)
    g = tl.load(tensors + 5 * t + 4)
    w_a = tl.load(weights + 2 * g)
    w_b = tl.load(weights + 2 * g + 1)
    n = tl.minimum(numel - start, CHUNK)
    has_a = a_addr != 0
    has_b = b_addr != 0
    a_ptr = a_addr.to(tl.pointer_type(A_DT)) + start
    b_ptr = b_addr.to(tl.pointer_type(B_DT)) + start
    o_ptr = o_addr.to(tl.pointer_type(O_DT)) + start
    if ALIGNED:
        a_ptr = tl.multiple_of(a_ptr, 16)
        b_ptr = tl.multiple_of(b_ptr, 16)
        o_ptr = tl.multiple_of(o_ptr, 16)
    offs = tl.arange(0, BLOCK)
    n_full = n - n % BLOCK
    for off in range(0, n_full, BLOCK):
        idx = off + offs
        y = w_a * _load_f32(a_ptr, idx, n, has_a, False, BLOCK) + w_b * _load_f32(b_ptr, idx, n, has_b, False, BLOCK)
        if ACCUMULATE:
            y += tl.load(o_ptr + idx).to(tl.float32)
        tl.store(o_ptr + idx, y.to(O_DT))
    idx = n_full + offs
    y = w_a * _load_f32(a_ptr, idx, n, has_a, True, BLOCK) + w_b * _load_f32(b_ptr, idx, n, has_b, True, BLOCK)
    if ACCUMULATE:
        y += tl.load(o_ptr + idx, mask=idx < n, other=0.0).to(tl.float32)
    tl.store(o_ptr + idx, y.to(O_DT), mask=idx < n)


def _to_device(rows: list[int], device: torch.device) -> torch.Tensor:
    """int64 host list -> device tensor without a host sync (pinned staging + non_blocking copy on CUDA)."""
    t = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


# NOTE: tables are cached by their full content (addresses, sizes, dtypes, groups), so a training loop that reuses
# its gradient buffers pays no host work or copy after the first step, and a CUDA graph captured after one warm-up
# call replays with tables that stay alive (a capture never records the pinned host->device copy).
_PLANS: OrderedDict = OrderedDict()
_MAX_PLANS = 16


def _plan(a: list, b: list, out: list | None, groups: list[int], num_groups: int, chunk: int):
    """Host-side tables for one call, built from shapes and addresses only (no device reads).

    Returns (tensor table [T, 5], {dtype key: (chunk table [C_k, 3], aligned)}, seg [G + 1], total slots), all
    int64 on the gradients' device. Slots are numbered group by group (stable in the list order).
    """
    desc = []  # per entry: (a address, b address, out address, numel, group, a dtype, b dtype, out dtype)
    for i, (x, y) in enumerate(zip(a, b)):
        z = x if x is not None else y
        o = out[i] if out is not None else None
        desc.append((x.data_ptr() if x is not None else 0, y.data_ptr() if y is not None else 0,
                     o.data_ptr() if o is not None else 0, z.numel(), groups[i], (x if x is not None else z).dtype,
                     (y if y is not None else z).dtype, (o if o is not None else x if x is not None else z).dtype))
    device = next(t.device for t in a + b if t is not None)
    key = (device, num_groups, chunk, tuple(desc))
    if key in _PLANS:
        _PLANS.move_to_end(key)
        return _PLANS[key]
    seg = [0] * (num_groups + 1)  # seg[g + 1] counts group g's chunks first, then becomes a prefix sum
    rows, launches, slot = [], {}, 0
    for pa, pb, po, numel, g, ta, tb, to in sorted(desc, key=lambda e: e[4]):
        rows.extend((pa, pb, po, numel, g))
        entry = launches.setdefault((ta, tb, to), [[], True])
        entry[1] = entry[1] and pa % 16 == 0 and pb % 16 == 0 and po % 16 == 0
        t = len(rows) // 5 - 1
        for start in range(0, numel, chunk):
            entry[0].extend((t, start, slot))  # iteration is group-sorted, so slots are too
            slot += 1
            seg[g + 1] += 1
    for g in range(num_groups):
        seg[g + 1] += seg[g]
    flat = rows + seg + [v for ch, _ in launches.values() for v in ch]
    meta = _to_device(flat, device)  # one host->device copy for all tables
    pos, out_launches = len(rows) + num_groups + 1, {}
    for dtypes, (ch, aligned) in launches.items():
        out_launches[dtypes] = (meta[pos: pos + len(ch)], aligned and chunk % 8 == 0)
        pos += len(ch)
    plan = (meta[: len(rows)], out_launches, meta[len(rows): len(rows) + num_groups + 1], seg[-1])
    _PLANS[key] = plan
    if len(_PLANS) > _MAX_PLANS:
        _PLANS.popitem(last=False)
    return plan


def _block(device: torch.device) -> tuple[int, int]:
    """(BLOCK, num_warps): wide blocks on the GPU, small ones in the interpreter.

    NOTE: not measured on a GPU yet (bench/gpu_bringup.sh runs bench/bench_sacp.py against the HBM bandwidth):
    GPU: 2048 elements over 8 warps = 8 fp32 per thread, two 16-byte loads per tensor per thread, the usual size
    for a bandwidth-bound elementwise pass; a multiple of 16 bytes for every dtype, and CHUNK / BLOCK = 32 full
    blocks per program. Interpreter (constraint only): each program's ops run as numpy calls, so the block trades
    Python overhead per iteration against array size; 1024 keeps the 65537-element test tensors to a few blocks.
    """
    return (2048, 8) if device.type == "cuda" else (1024, 4)


def gradient_gram_fwd(a: list, b: list, groups: list[int], num_groups: int, chunk: int = CHUNK) -> torch.Tensor:
    """fp32 [num_groups, 3] (dot, |a|^2, |b|^2) per group. ``a``/``b``: aligned lists of contiguous tensors or None
    (never both None at one position); ``groups``: group id per position."""
    device = next(x for x in a + b if x is not None).device
    gram = torch.empty(num_groups, 3, device=device, dtype=torch.float32)  # every row is written by the reduce
    tensors, launches, seg, total = _plan(a, b, None, groups, num_groups, chunk)
    partials = torch.empty(max(total, 1), 3, device=device, dtype=torch.float32)
    block, warps = _block(device)
    for (ta, tb, _), (ch, aligned) in launches.items():
        if ch.numel() == 0:  # only zero-size tensors in this dtype combination
            continue
        _gram_partials_kernel[(ch.numel() // 3,)](tensors, ch, partials, A_DT=_TL_DTYPE[ta], B_DT=_TL_DTYPE[tb],
                                                  CHUNK=chunk, BLOCK=block, ALIGNED=aligned, num_warps=warps)
    _gram_reduce_kernel[(num_groups,)](partials, seg, gram, BLOCK=256, num_warps=4)
    return gram


def sacp_combine_fwd(out: list, a: list, b: list, groups: list[int], weights: torch.Tensor, accumulate: bool,
                     chunk: int = CHUNK) -> None:
    """out[i] (=|+=) w_a[g_i] * a[i] + w_b[g_i] * b[i]; ``weights``: fp32 [G, 2]; ``out`` contiguous tensors."""
    if not out:
        return
    tensors, launches, _, _ = _plan(a, b, out, groups, weights.shape[0], chunk)
    block, warps = _block(out[0].device)
    for (ta, tb, to), (ch, aligned) in launches.items():
        if ch.numel() == 0:
            continue
        _combine_kernel[(ch.numel() // 3,)](tensors, ch, weights, A_DT=_TL_DTYPE[ta], B_DT=_TL_DTYPE[tb],
                                            O_DT=_TL_DTYPE[to], CHUNK=chunk, BLOCK=block, ACCUMULATE=accumulate,
                                            ALIGNED=aligned, num_warps=warps)
