"""Triton SwiGLU: silu(gate) * up in one pass, and its backward in one pass. (Not swiglu.py:
importing a submodule of that name would shadow the function `furnace_kernels.swiglu`.)

Saves only gate and up (autograd's unfused version also keeps silu(gate)); silu is recomputed in
the backward. Rounds where the reference (`F.silu(gate) * up`) rounds: silu(gate) to gate's dtype,
then the product.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _swiglu_fwd(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(G + offs, mask=m, other=0.0)
    u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
    gf = g.to(tl.float32)
    silu = (gf * tl.sigmoid(gf)).to(g.dtype).to(tl.float32)
    tl.store(Y + offs, (silu * u).to(Y.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    dy = tl.load(DY + offs, mask=m, other=0.0)
    g = tl.load(G + offs, mask=m, other=0.0)
    u = tl.load(U + offs, mask=m, other=0.0)
    gf = g.to(tl.float32)
    sig = tl.sigmoid(gf)
    silu = (gf * sig).to(g.dtype).to(tl.float32)
    dyf = dy.to(tl.float32)
    tl.store(DU + offs, (dyf * silu).to(dy.dtype).to(DU.dtype.element_ty), mask=m)
    dsilu = (dyf * u.to(tl.float32)).to(dy.dtype).to(g.dtype).to(tl.float32)
    tl.store(DG + offs, (dsilu * sig * (1.0 + gf * (1.0 - sig))).to(DG.dtype.element_ty), mask=m)


def _block(n: int) -> int:
    return 1024 if not INTERPRET else max(16, min(4096, triton.next_power_of_2(max(n, 1))))


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g, u = gate.contiguous(), up.contiguous()
        y = torch.empty(g.shape, dtype=torch.result_type(gate, up), device=g.device)
        n = g.numel()
        if n:
            _swiglu_fwd[(triton.cdiv(n, _block(n)),)](g, u, y, n, BLOCK=_block(n), num_warps=4)
        ctx.save_for_backward(g, u)
        return y

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dy = dy.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        n = g.numel()
        if n:
            _swiglu_bwd[(triton.cdiv(n, _block(n)),)](dy, g, u, dg, du, n, BLOCK=_block(n), num_warps=4)
        return dg, du


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
    if not gate.is_cuda and not INTERPRET:
        raise RuntimeError("swiglu: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1)")
    return SwiGLUFunction.apply(gate, up)
