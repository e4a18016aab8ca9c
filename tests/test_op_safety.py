"""Op safety rules (issue 14, item 6), as hypothesis properties on every backend:

* NaN and inf propagate through ``attention`` as in the reference (no silent zeros, no spurious NaN);
* ``vq_sample`` / ``codebook_cross_entropy`` accept a temperature iff it is finite, > 0 and 1/T stays finite in the
  kernels' fp32 arithmetic (1/T <= 2**126: headroom for base-2 logits and logit differences);
* ``gradient_gram`` / ``sacp_project`` accept group ids only in [0, number of tensors), and reject a wrong ``out``
  entry (device, dtype, shape) before writing anything;
* every message names the public function.
"""
import math

import pytest
import torch
from conftest import assert_close_to_ref, require
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dera_fast.ops import attention, attention_ref, codebook_cross_entropy, gradient_gram, sacp_project, vq_sample

FP32_MAX = torch.finfo(torch.float32).max
INV_LIMIT = 2.0 ** 126
# NOTE: the `backend` fixture is function-scoped but constant per test; hypothesis need not reset it per example
PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------------------------------------------------------
# attention: NaN / inf propagation
# ---------------------------------------------------------------------------------------------------------------
@st.composite
def _poisoned_attention(draw):
    h, lq, lk = draw(st.integers(1, 2)), draw(st.integers(1, 19)), draw(st.integers(1, 19))
    causal = draw(st.booleans())
    if causal and lq > lk:  # keep every row with at least one visible key (fully masked rows: another test)
        lq = lk
    where = draw(st.sampled_from(["q", "k", "v"]))
    row = draw(st.integers(0, (lq if where == "q" else lk) - 1))
    col = draw(st.integers(0, 31))
    value = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    return h, lq, lk, causal, where, row, col, value, draw(st.integers(0, 2**16))


def _sees(where, row, lq, lk, causal):
    """Bool [Lq]: the query rows whose visible inputs include the poisoned q row / key."""
    rows = torch.arange(lq)
    if where == "q":
        return rows == row
    return (row <= rows + (lk - lq)) if causal else torch.ones(lq, dtype=torch.bool)


@PROPERTY
@given(case=_poisoned_attention())
def test_attention_propagates_nan_and_inf(backend, case):
    device = require(backend, "attention")
    h, lq, lk, causal, where, row, col, value, seed = case
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, n, 32, generator=g) for n in (lq, lk, lk))
    {"q": q, "k": k, "v": v}[where][0, :, row, col] = value
    out = attention(q.to(device), k.to(device), v.to(device), causal=causal, backend=backend).cpu()
    ref = attention_ref(q, k, v, causal=causal, q_offset=lk - lq)
    bad, ref_bad = ~torch.isfinite(out).all(-1), ~torch.isfinite(ref).all(-1)  # [1, H, Lq]
    sees = _sees(where, row, lq, lk, causal)
    # no silent repair: a row that sees the bad value and is non-finite in the reference is non-finite here
    assert not (ref_bad & sees & ~bad).any(), f"rows finite here but not in the reference: {(ref_bad & ~bad)}"
    # no spurious NaN: a row non-finite here is non-finite in the reference
    assert not (bad & ~ref_bad).any(), f"rows non-finite here only: {(bad & ~ref_bad)}"
    ok = ~ref_bad
    ref64 = attention_ref(q.double(), k.double(), v.double(), causal=causal, q_offset=lk - lq)
    assert_close_to_ref("finite rows", out[ok], ref64[ok], ref[ok])


def test_attention_nan_query_row_is_nan_not_zero(backend):
    """The case issue 14 found: SDPA's fused kernels returned 0 for a NaN query row."""
    device = require(backend, "attention")
    q, k, v = (torch.randn(2, 2, 9, 32, device=device) for _ in range(3))
    q[1, 0, 4, 7] = float("nan")
    k2 = k.clone()
    k2[0, 1, 0] = float("nan")  # causal: every row sees key 0, so every row of (0, 1) is NaN
    for causal in (False, True):
        out = attention(q, k, v, causal=causal, backend=backend)
        assert out[1, 0, 4].isnan().all() and torch.isfinite(out[0]).all()
        out = attention(q.nan_to_num(), k2, v, causal=causal, backend=backend)
        assert out[0, 1].isnan().any(-1).all() and torch.isfinite(out[1]).all()


# ---------------------------------------------------------------------------------------------------------------
# temperatures: 1 / T must stay finite in fp32
# ---------------------------------------------------------------------------------------------------------------
_TEMPERATURES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-45, 1e-39, 2.95e-39, 1 / FP32_MAX, 1e-38, 2.0 ** -126, 1.2e-38, 0.03, 1.0, 1e30]))


def _temperature_ok(t: float) -> bool:
    return math.isfinite(t) and t > 0 and 1.0 / t <= INV_LIMIT


@PROPERTY
@given(t=_TEMPERATURES)
def test_temperature_rule(backend, t):
    device = require(backend, "vq_sample")
    z, cb = torch.randn(5, 8, device=device), torch.randn(11, 8, device=device)
    target = torch.randint(0, 11, (5,), device=device)
    calls = {"vq_sample": lambda: vq_sample(z, cb, temperature=t, backend=backend),
             "codebook_cross_entropy": lambda: codebook_cross_entropy(z, cb, target, temperature=t,
                                                                      reduction="none", backend=backend)}
    for name, call in calls.items():
        if _temperature_ok(t):
            out = call()
            if name == "vq_sample":
                assert ((out >= 0) & (out < 11)).all()
            else:
                assert out.shape == (5,) and not out.isnan().any()
        else:
            with pytest.raises(ValueError, match=rf"^{name}: temperature"):
                call()


# ---------------------------------------------------------------------------------------------------------------
# SACP: group ids and out tensors
# ---------------------------------------------------------------------------------------------------------------
@PROPERTY
@given(groups=st.lists(st.integers(-3, 12), min_size=4, max_size=4))
def test_group_ids_must_index_the_tensors(backend, groups):
    device = require(backend, "sacp_project")
    a = [torch.randn(3, device=device) for _ in range(4)]
    b = [torch.randn(3, device=device) for _ in range(4)]
    if all(0 <= g < 4 for g in groups):
        assert gradient_gram(a, b, groups=groups, backend=backend).shape == (max(groups) + 1, 3)
        assert len(sacp_project(a, b, groups=groups, backend=backend)) == 4
    else:
        for name, call in (("gradient_gram", gradient_gram), ("sacp_project", sacp_project)):
            with pytest.raises(ValueError, match=rf"^{name}: groups must hold ids in \[0, 4\)"):
                call(a, b, groups=groups, backend=backend)


def test_huge_group_id_is_rejected_not_allocated():
    with pytest.raises(ValueError, match="gradient_gram: groups"):
        gradient_gram([torch.ones(2)] * 2, [torch.ones(2)] * 2, groups=[0, 10**9])


@st.composite
def _bad_out(draw):
    n = draw(st.integers(2, 5))
    kind = draw(st.sampled_from(["device", "dtype", "shape", "type"]))
    # entry 0 has no gradient, hence no shape to check against
    bad_at = draw(st.integers(1 if kind == "shape" else 0, n - 1))
    return n, bad_at, kind, draw(st.booleans())


@PROPERTY
@given(case=_bad_out())
def test_bad_out_rejected_before_any_write(backend, case):
    device = require(backend, "sacp_project")
    n, bad_at, kind, accumulate = case
    a = [torch.randn(4, device=device) for _ in range(n)]
    b = [-x for x in a]  # conflicting: every output would change
    a[0] = b[0] = None  # both None: an `out` entry here would be zeroed
    out = [torch.full((4,), 7.0, device=device) for _ in range(n)]
    out[bad_at] = {"device": torch.empty(4, device="meta"), "dtype": torch.zeros(4, dtype=torch.int32, device=device),
                   "shape": torch.zeros(5, device=device), "type": [0.0] * 4}[kind]
    exc = TypeError if kind in ("dtype", "type") else ValueError
    with pytest.raises(exc, match=rf"^sacp_project: out\[{bad_at}\]"):
        sacp_project(a, b, out=out, accumulate=accumulate, backend=backend)
    for i, o in enumerate(out):
        if i != bad_at:
            assert (o == 7.0).all(), f"out[{i}] was written before the error"
