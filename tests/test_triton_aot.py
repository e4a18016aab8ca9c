"""Compile every Triton kernel config ahead of time for Hopper (sm_90) without a GPU.

The interpreter accepts things the GPU compiler rejects (tl.dot inner dims < 16, shared-memory overflow, bad
pointer casts); this test runs the real compiler pipeline down to a cubin for each (kernel, config) the launchers
can pick and checks that the shared memory fits an H100/H200 SM (227 KB usable per block).

The compiles run in one subprocess with TRITON_INTERPRET=0: in a process that imported triton.language under the
interpreter, Triton's own @jit standard-library functions (tl.min, tl.cumsum, ...) are interpreter objects and
cannot be compiled. The spec list is built the same way in both processes (from the kernel modules' own config
tables), so the parent knows the test ids and the child compiles exactly those.
"""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

REPO = pathlib.Path(__file__).resolve().parents[1]
SMEM_LIMIT = 227 * 1024


def _load(module: str):
    spec = importlib.util.spec_from_file_location(f"_aot_{module}", REPO / "kernels" / f"{module}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _vq_specs(m):
    """Every block config kernels/vq.py:_blocks returns, bf16 rows (16-bit codebooks for the CE kernels)."""
    ptr = {"z_ptr": "*bf16", "h_ptr": "*bf16", "cb_ptr": "*fp32", "bias_ptr": "*fp32", "u_ptr": "*fp32",
           "out_ptr": "*i64", "t_ptr": "*i64", "loss_ptr": "*fp32", "lse_ptr": "*fp32", "g_ptr": "*fp32",
           "dh_ptr": "*fp32", "dc_ptr": "*fp32", "N": "i32", "K": "i32", "D": "i32", "inv_t": "fp32"}
    for D in (8, 16, 33, 64, 256):
        BN, BK, BD, warps = m._blocks(D)
        for name in ("_vq_nearest_fwd_kernel", "_vq_sample_fwd_kernel", "_codebook_ce_fwd_kernel",
                     "_codebook_ce_bwd_dh_kernel", "_codebook_ce_bwd_dc_kernel"):
            sig = {**ptr, "cb_ptr": "*bf16"} if "ce" in name else ptr
            consts = dict(BLOCK_N=BN, BLOCK_K=BK, BLOCK_D=BD, PRECISION=m.INPUT_PRECISION)
            yield f"vq-{name.strip('_')}-D{D}", name, sig, consts, dict(num_warps=warps), {}


def _attention_specs(m):
    """Each kernel x dtype x head-dim bucket of kernels/attention.py:_GPU_BLOCKS, varlen + causal (every branch)."""
    tensors, rows = ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ"), ("LSE", "DELTA")
    for name, kind in (("_attention_fwd_kernel", "fwd"), ("_attention_bwd_dkdv_kernel", "dkdv"),
                       ("_attention_bwd_dq_kernel", "dq")):
        for dtype in ("bf16", "fp32"):
            for block_d in (16, 64, 128):
                bm, bn, warps, stages = m._GPU_BLOCKS[(kind, max(block_d, 64), 4 if dtype == "fp32" else 2)]
                # the forward also runs with the query block shrunk to 16 rows for short-Lq calls
                for bm, warps in ([(bm, warps), (16, 4)] if kind == "fwd" else [(bm, warps)]):
                    consts = dict(VARLEN=True, CAUSAL=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d,
                                  DOT_PREC="ieee" if dtype == "fp32" else "tf32")
                    sig = {a: f"*{dtype}" if a in tensors else "*fp32" if a in rows else "*i32" if a.startswith("CU_")
                           else "fp32" if a == "scale" else "i32" for a in getattr(m, name).arg_names}
                    yield (f"attention-{kind}-{dtype}-D{block_d}-BM{bm}", name, sig, consts,
                           dict(num_warps=warps, num_stages=stages), {})
    for name in ("_attention_merge_kernel", "_attention_bwd_preprocess_kernel"):
        sig = {a: "*bf16" if a in ("O", "DO") else "*fp32" if a in ("OP", "LSEP", "LSE", "DELTA") else "i32"
               for a in getattr(m, name).arg_names}
        yield f"attention-{name.strip('_')}", name, sig, dict(BLOCK_R=64, BLOCK_D=128), dict(num_warps=4), {}


def _sacp_specs(m):
    """The multi-tensor kernels of kernels/sacp.py; the aligned variants must get 16-byte vector loads."""
    import triton.language as tl

    ptr = {"tensors": "*i64", "chunks": "*i64", "partials": "*fp32", "seg": "*i64", "gram": "*fp32", "weights": "*fp32"}
    cases = {
        "gram-bf16-fp32-aligned": ("_gram_partials_kernel", dict(A_DT=tl.bfloat16, B_DT=tl.float32, CHUNK=m.CHUNK,
                                                                 BLOCK=2048, ALIGNED=True), {"min_v4": 1}),
        "gram-fp16-fp16": ("_gram_partials_kernel", dict(A_DT=tl.float16, B_DT=tl.float16, CHUNK=m.CHUNK,
                                                         BLOCK=2048, ALIGNED=False), {}),
        "reduce": ("_gram_reduce_kernel", dict(BLOCK=256), {}),
        "combine-bf16-aligned": ("_combine_kernel", dict(A_DT=tl.bfloat16, B_DT=tl.bfloat16, O_DT=tl.bfloat16,
                                                         CHUNK=m.CHUNK, BLOCK=2048, ACCUMULATE=True, ALIGNED=True),
                                 {"min_v4": 1}),
    }
    for sid, (name, consts, checks) in cases.items():
        yield f"sacp-{sid}", name, ptr, consts, dict(num_warps=8), checks


_BUILDERS = {"vq": _vq_specs, "attention": _attention_specs, "sacp": _sacp_specs}


def build_specs(load=_load):
    """[(id, module, kernel, signature, constexprs, options, checks)] for every kernel module."""
    return [(sid, module, *rest) for module, build in _BUILDERS.items() for sid, *rest in build(load(module))]


def compile_specs() -> dict:
    """Runs in the subprocess: compile every spec for sm_90, return {id: {"ok", "shared", "error"}}."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mods = {name: _load(name) for name in _BUILDERS}
    results = {}
    for sid, module, kernel, signature, consts, options, checks in build_specs(mods.__getitem__):
        fn = getattr(mods[module], kernel)
        sig = {a: "constexpr" if a in consts else signature[a] for a in fn.arg_names}
        try:
            try:  # Triton >= 3.9 keys constexprs by name
                src = ASTSource(fn, sig, constexprs=consts)
            except (TypeError, KeyError, AttributeError):  # Triton 3.6 keys them by argument path
                src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
            ptx = k.asm["ptx"]
            error = None if (k.asm.get("cubin") and ".target sm_90" in ptx) else "no sm_90 cubin"
            if error is None and ptx.count("ld.global.v4") < checks.get("min_v4", 0):
                error = "expected 16-byte vector loads (ld.global.v4) in the aligned variant"
            results[sid] = {"ok": error is None, "shared": k.metadata.shared, "error": error}
        except Exception as e:  # report per kernel; the parent test asserts
            results[sid] = {"ok": False, "shared": None, "error": f"{type(e).__name__}: {e}"[:2000]}
    return results


@pytest.fixture(scope="module")
def compiled():
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    code = (f"import sys, json; sys.path.insert(0, {str(REPO / 'tests')!r})\n"
            "import test_triton_aot as t\nprint(json.dumps(t.compile_specs()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("sid", [s[0] for s in build_specs()])
def test_kernel_compiles_for_sm90(compiled, sid):
    res = compiled[sid]
    assert res["ok"], res["error"]
    assert res["shared"] <= SMEM_LIMIT, f"shared memory {res['shared']} B > {SMEM_LIMIT} B"
