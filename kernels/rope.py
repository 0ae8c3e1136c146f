"""Triton rotary embedding, applied in place to q and k (HF Llama's rotate_half convention, as
furnace/model/llama.py apply_rope): out = x * cos + cat(-x2, x1) * sin on the halves x1, x2.

In place because q/k are fresh projections nobody else reads: no second [B, H, L, D] buffer.
The backward applies the transpose, dx1 = dy1 * cos1 + dy2 * sin2, dx2 = dy2 * cos2 - dy1 * sin1
(for llama's cos/sin, whose halves are equal, the rotation by -sin). Any strides for q/k/cos/sin
(split_heads' transposed view included); cos/sin broadcast over heads (and batch when it is 1).
Math in fp32, one rounding (the reference rounds each product: fp16 differs by an ulp or so).
cos/sin get no gradient.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .fused_reference import rope_cos_sin_4d

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _rope_kernel(X, OUT, C, S, n_rows, H, L, half,
                 sxb, sxh, sxl, sxd, sob, soh, sol, sod, scb, scl, scd, ssb, ssl, ssd,
                 BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # row = (b * H + h) * L + l
    li = rows % L
    bh = rows // L
    hi = bh % H
    bi = bh // H
    d = tl.arange(0, BLOCK_D)
    m = (rows < n_rows)[:, None] & (d < half)[None, :]
    xo = (bi * sxb + hi * sxh + li * sxl)[:, None]
    co = (bi * scb + li * scl)[:, None]
    so = (bi * ssb + li * ssl)[:, None]
    d1 = d[None, :]
    d2 = d1 + half
    x1 = tl.load(X + xo + d1 * sxd, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(X + xo + d2 * sxd, mask=m, other=0.0).to(tl.float32)
    c1 = tl.load(C + co + d1 * scd, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(C + co + d2 * scd, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(S + so + d1 * ssd, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(S + so + d2 * ssd, mask=m, other=0.0).to(tl.float32)
    if BACKWARD:
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    oo = (bi * sob + hi * soh + li * sol)[:, None]
    tl.store(OUT + oo + d1 * sod, o1.to(OUT.dtype.element_ty), mask=m)
    tl.store(OUT + oo + d2 * sod, o2.to(OUT.dtype.element_ty), mask=m)


def _rotate(x: torch.Tensor, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> None:
    b, h, l, d = x.shape
    c = cos[:, 0].expand(b, l, d)
    s = sin[:, 0].expand(b, l, d)
    half = d // 2
    n_rows = b * h * l
    if not n_rows:
        return
    block_d = triton.next_power_of_2(half)
    per_program = 4096 if INTERPRET else 2048  # elements of each half; the interpreter likes few programs
    block_r = max(1, min(triton.next_power_of_2(n_rows), per_program // block_d))
    _rope_kernel[(triton.cdiv(n_rows, block_r),)](
        x, out, c, s, n_rows, h, l, half, *x.stride(), *out.stride(), *c.stride(), *s.stride(),
        BACKWARD=backward, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)


class RopeInplaceFunction(torch.autograd.Function):
    """One tensor per Function: autograd refuses a Function that modifies a view in place and
    returns more than one tensor (q/k are views: split_heads' transpose)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        _rotate(x, x, cos, sin, False)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        return x

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        dx = torch.empty(dy.shape, dtype=dy.dtype, device=dy.device)
        _rotate(dy, dx, cos, sin, True)
        return dx, None, None


def rope_triton_(q, k, cos, sin):
    cos, sin = rope_cos_sin_4d(cos, sin)
    for name, x in (("q", q), ("k", k)):
        if x.dim() != 4 or x.shape[-1] % 2 or cos.shape[0] not in (1, x.shape[0]) or x.shape[2:] != cos.shape[2:] \
                or x.shape[0] != q.shape[0]:
            raise ValueError(f"rope_: {name} must be [B, H, L, D] (D even) matching cos/sin {tuple(cos.shape)}; "
                             f"got {tuple(x.shape)}")
    if cos.shape != sin.shape:
        raise ValueError(f"rope_: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have one shape")
    if not q.is_cuda and not INTERPRET:
        raise RuntimeError("rope_: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1)")
    return RopeInplaceFunction.apply(q, cos, sin), RopeInplaceFunction.apply(k, cos, sin)
