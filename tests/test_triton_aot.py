"""Compile every Triton kernel config ahead of time for Hopper (sm_90) without a GPU.

The interpreter accepts things the GPU compiler rejects (tl.dot inner dims < 16, shared-memory overflow); this
test runs the real compiler pipeline down to a cubin for each (kernel, block config) the launchers can pick, and
checks the shared memory fits an H100/H200 SM (228 KB, of which 227 KB usable per block).
"""
import importlib.util
import pathlib

import pytest

triton = pytest.importorskip("triton")

REPO = pathlib.Path(__file__).resolve().parents[1]
SMEM_LIMIT = 227 * 1024


def _load_compiled(module: str):
    """Import kernels/<module>.py afresh with the interpreter off, so @triton.jit yields compilable kernels."""
    knobs = triton.knobs.runtime
    old = knobs.interpret
    knobs.interpret = False
    try:
        spec = importlib.util.spec_from_file_location(f"_aot_{module}", REPO / "kernels" / f"{module}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        knobs.interpret = old
    return mod


def compile_for_hopper(fn, signature: dict, constexprs: dict, num_warps: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {name: ("constexpr" if name in constexprs else signature[name]) for name in fn.arg_names}
    try:  # Triton >= 3.9 keys constexprs by name
        src = ASTSource(fn, sig, constexprs=constexprs)
    except (TypeError, KeyError, AttributeError):  # Triton 3.6 keys them by argument path
        src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def _vq_cases():
    ptr = {"z_ptr": "*bf16", "h_ptr": "*bf16", "cb_ptr": "*fp32", "bias_ptr": "*fp32", "u_ptr": "*fp32",
           "out_ptr": "*i64", "t_ptr": "*i64", "loss_ptr": "*fp32", "lse_ptr": "*fp32", "g_ptr": "*fp32",
           "dh_ptr": "*fp32", "dc_ptr": "*fp32", "N": "i32", "K": "i32", "D": "i32", "inv_t": "fp32"}
    kernels = ["_vq_nearest_fwd_kernel", "_vq_sample_fwd_kernel", "_codebook_ce_fwd_kernel",
               "_codebook_ce_bwd_dh_kernel", "_codebook_ce_bwd_dc_kernel"]
    for D in (8, 16, 33, 64, 256):  # every block config _blocks() can return
        for name in kernels:
            yield pytest.param("vq", name, ptr, D, id=f"vq-{name.strip('_')}-D{D}")


@pytest.mark.parametrize("module, kernel, signature, D", list(_vq_cases()))
def test_vq_kernel_compiles_for_sm90(module, kernel, signature, D):
    mod = _load_compiled(module)
    BN, BK, BD, warps = mod._blocks(D)
    fn = getattr(mod, kernel)
    # the CE kernels see bf16 codebooks too: use the 16-bit pointer type for every row/codebook input there
    sig = dict(signature)
    if "ce" in kernel:
        sig["cb_ptr"] = "*bf16"
    k = compile_for_hopper(fn, sig, dict(BLOCK_N=BN, BLOCK_K=BK, BLOCK_D=BD, PRECISION=mod.INPUT_PRECISION),
                           num_warps=warps)
    assert k.asm.get("cubin"), "no cubin produced"
    assert ".target sm_90" in k.asm["ptx"]
    assert k.metadata.shared <= SMEM_LIMIT, f"shared memory {k.metadata.shared} B > {SMEM_LIMIT} B"
