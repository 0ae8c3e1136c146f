"""Without a GPU: compile the Triton kernels for sm_90 (frontend, LLVM and Triton's bundled ptxas),
so a kernel that only the interpreter accepts is caught before a GPU session. On a CUDA machine
the GPU tests compile them for real, so this is skipped there."""
import os
import subprocess
import sys

import pytest
import torch

CODE = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
import furnace_kernels.flash_attention as fa
import furnace_kernels.glu as gl
import furnace_kernels.linear_ce_triton as lc
import furnace_kernels.loss_scale as ls
import furnace_kernels.media_attention_triton as ma
import furnace_kernels.norms as nm
import furnace_kernels.rope as rp
assert not fa.INTERPRET and not nm.INTERPRET
target = GPUTarget("cuda", 90, 32)

def build(kernel, ptrs, constexprs, floats=(), warps=4):
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    sig = {n: ("constexpr" if n in constexprs else ptrs.get(n, "fp32" if n in floats else "i32")) for n in fn.arg_names}
    triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=target,
                   options={"num_warps": warps, "num_stages": 2})
    print("compiled", fn.__name__, flush=True)

ptrs = {n: "*fp16" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
ptrs.update({"LSE": "*fp32", "DELTA": "*fp32", "QSEG": "*i32", "KSEG": "*i32"})
ce = dict(GROUP=2, CAUSAL=True, HAS_SEG=True, DOT_PREC="tf32", BLOCK_D=128, BLOCK_M=64, BLOCK_N=64)
build(fa._attn_fwd, ptrs, ce, floats=("qk_scale",))
build(fa._attn_bwd_dkdv, ptrs, ce, floats=("qk_scale", "sm_scale"))
build(fa._attn_bwd_dq, ptrs, ce, floats=("qk_scale", "sm_scale"))
build(fa._attn_bwd_delta, ptrs, dict(BLOCK_M=64, BLOCK_D=128))
# the Flamingo cross-attention kernels: range tables int32, sort permutations int64
mp = dict(ptrs, QID="*i32", QHI="*i32", KID="*i32", KLO="*i32", KHI="*i32", KPERM="*i64", QPERM="*i64")
mc = dict(GROUP=2, DOT_PREC="tf32", BLOCK_D=128, BLOCK_M=64, BLOCK_N=64)
build(ma._media_fwd, mp, mc, floats=("qk_scale",))
build(ma._media_bwd_dq, mp, mc, floats=("qk_scale", "sm_scale"))
build(ma._media_bwd_dkdv, mp, mc, floats=("qk_scale", "sm_scale"))
build(ma._media_bwd_span, mp, mc, floats=("qk_scale", "sm_scale"))
build(ma._media_bwd_blind_dq, mp, dict(BLOCK_M=64, BLOCK_D=128))
mt_stats, mt_scale = ls._kernels()
p = {"BASE": "*bf16", "REL": "*i64", "NUMEL": "*i64", "CHUNK_T": "*i32", "CHUNK_S": "*i64", "PART_SQ": "*fp32",
     "PART_NF": "*i32", "FACTOR": "*fp32"}
build(mt_stats, p, dict(ALIGN=8, BLOCK=1024, ITERS=4), floats=("inv_scale",))
build(mt_scale, p, dict(ALIGN=8, BLOCK=1024, ITERS=4))
# the fused norms, SwiGLU, RoPE and cross-entropy row kernels
for dt in ("bf16", "fp16"):
    p = {n: "*" + dt for n in ("X", "R", "S", "W", "Y", "DY", "DS", "DX", "G", "U", "DG", "DU", "OUT", "C")}
    p.update(RSTD="*fp32", DW_PART="*fp32")
    for res in (False, True):
        build(nm._rms_fwd, p, dict(HAS_RES=res, BLOCK_M=2, BLOCK_N=2048), floats=("eps",), warps=8)
    for ds in (False, True):
        build(nm._rms_bwd, p, dict(HAS_DS=ds, HAS_DW=not ds, BLOCK_M=1, BLOCK_N=4096), warps=8)
    build(gl._swiglu_fwd, p, dict(BLOCK=1024))
    build(gl._swiglu_bwd, p, dict(BLOCK=1024))
    for bw in (False, True):
        build(rp._rope_kernel, p, dict(BACKWARD=bw, BLOCK_R=32, BLOCK_D=64))
    q = {"X": "*" + dt, "TGT": "*i64", "M": "*fp32", "S": "*fp32", "T": "*fp32", "LSE": "*fp32", "SCALE": "*fp32"}
    build(lc._ce_stats, q, dict(BLOCK_V=4096), warps=8)
    build(lc._ce_grad, q, dict(BLOCK_V=4096), warps=8)
print("ALL OK")
"""


def _ptxas_available():
    try:
        import triton

        return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))
    except Exception:
        return False


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernels for real")
@pytest.mark.skipif(not _ptxas_available(), reason="Triton's bundled ptxas not found")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "ALL OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
