"""Triton RMSNorm and residual-add + RMSNorm, forward and backward.

Numerics follow furnace/model/layers.py (HF Llama): the norm in fp32, the normalised row rounded
to the input dtype, then `weight * xn` in the promoted dtype. The kernels round at the same
places, so fp32/fp16 results match the reference up to the reduction order.

Forward: one program per BLOCK_M rows (a whole row in registers: hidden sizes up to 64K);
saves rstd [rows] fp32. Backward: a persistent grid, each program walks its rows and keeps a
dweight partial in fp32; the partials are summed once afterwards (no atomics).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _rms_fwd(X, R, S, W, Y, RSTD, n_rows, n_cols, sx, sr, ss, sy, eps,
             HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < n_rows
    cmask = cols < n_cols
    m = rmask[:, None] & cmask[None, :]
    x = tl.load(X + rows[:, None] * sx + cols[None, :], mask=m, other=0.0)
    if HAS_RES:  # the sum rounded to its dtype, as `x + residual` is
        r = tl.load(R + rows[:, None] * sr + cols[None, :], mask=m, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + rows[:, None] * ss + cols[None, :], x, mask=m)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / n_cols + eps)
    xn = (xf * rstd[:, None]).to(x.dtype).to(tl.float32)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(Y + rows[:, None] * sy + cols[None, :], (w[None, :] * xn).to(Y.dtype.element_ty), mask=m)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _rms_bwd(DY, X, W, RSTD, DS, DX, DW_PART, n_rows, n_cols, sdy, sx, sds, sdx, rows_per_prog,
             HAS_DS: tl.constexpr, HAS_DW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < n_cols
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_prog
    for i in range(0, rows_per_prog, BLOCK_M):
        rows = first + i + tl.arange(0, BLOCK_M)
        rmask = rows < n_rows
        m = rmask[:, None] & cmask[None, :]
        x = tl.load(X + rows[:, None] * sx + cols[None, :], mask=m, other=0.0)
        xf = x.to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = xf * rstd[:, None]
        dy = tl.load(DY + rows[:, None] * sdy + cols[None, :], mask=m, other=0.0)
        # d(xn): dy * w in the output dtype, then in the input dtype (autograd's casts)
        dxn = (dy.to(tl.float32) * w[None, :]).to(dy.dtype).to(x.dtype).to(tl.float32)
        if HAS_DW:
            dw += tl.sum(dy.to(tl.float32) * xhat.to(x.dtype).to(tl.float32), axis=0)
        c = tl.sum(dxn * xhat, axis=1) / n_cols
        dx = (rstd[:, None] * (dxn - xhat * c[:, None])).to(x.dtype)
        if HAS_DS:  # the sum's own gradient joins the norm's (in the sum's dtype, as autograd adds)
            ds = tl.load(DS + rows[:, None] * sds + cols[None, :], mask=m, other=0.0)
            dx = (dx.to(tl.float32) + ds.to(tl.float32)).to(x.dtype)
        tl.store(DX + rows[:, None] * sdx + cols[None, :], dx, mask=m)
    if HAS_DW:
        tl.store(DW_PART + pid * n_cols + cols, dw, mask=cmask)


def _rows2d(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _blocks(n_cols: int, n_rows: int):
    block_n = triton.next_power_of_2(n_cols)
    if block_n > 65536:
        raise ValueError(f"rms_norm: hidden size {n_cols} > 65536 is not supported by the Triton kernel")
    block_m = max(1, min(triton.next_power_of_2(max(n_rows, 1)), 4096 // block_n))
    elems = block_m * block_n
    warps = 4 if elems <= 2048 else 8 if elems <= 8192 else 16
    return block_m, block_n, warps


def _n_programs(x: torch.Tensor, n_blocks: int) -> int:
    if INTERPRET or not x.is_cuda:
        return max(1, min(n_blocks, 2))
    return max(1, min(n_blocks, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count))


def _fwd(x, residual, weight, eps):
    n = x.shape[-1]
    x2 = _rows2d(x)
    rows = x2.shape[0]
    s2 = None
    if residual is not None:
        r2 = _rows2d(residual)
        s2 = torch.empty(x2.shape, dtype=torch.result_type(x, residual), device=x.device)
    norm_dtype = x.dtype if s2 is None else s2.dtype
    y2 = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, norm_dtype), device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    bm, bn, warps = _blocks(n, rows)
    if rows:
        _rms_fwd[(triton.cdiv(rows, bm),)](
            x2, r2 if s2 is not None else x2, s2 if s2 is not None else x2, weight, y2, rstd, rows, n,
            x2.stride(0), r2.stride(0) if s2 is not None else 0, s2.stride(0) if s2 is not None else 0,
            y2.stride(0), float(eps), HAS_RES=s2 is not None, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
    return (s2 if s2 is not None else x2), y2, rstd


def _bwd(dy, xn_in, weight, rstd, ds, need_dw):
    """dx (of the norm's input, plus ds when given) and dweight (or None)."""
    rows, n = xn_in.shape
    dy2 = _rows2d(dy)
    ds2 = _rows2d(ds) if ds is not None else None
    dx = torch.empty_like(xn_in)
    bm, bn, warps = _blocks(n, rows)
    progs = _n_programs(xn_in, triton.cdiv(rows, bm))
    rows_per_prog = triton.cdiv(triton.cdiv(rows, bm), progs) * bm
    part = torch.empty((progs, n), dtype=torch.float32, device=xn_in.device) if need_dw else None
    if rows:
        _rms_bwd[(progs,)](
            dy2, xn_in, weight, rstd, ds2 if ds2 is not None else dy2, dx, part if part is not None else rstd,
            rows, n, dy2.stride(0), xn_in.stride(0), ds2.stride(0) if ds2 is not None else 0, dx.stride(0),
            rows_per_prog, HAS_DS=ds2 is not None, HAS_DW=need_dw, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
    dw = None
    if need_dw:
        dw = (part.sum(0) if rows else torch.zeros(n, device=weight.device)).to(weight.dtype)
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2, y2, rstd = _fwd(x, None, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y2.view(*x.shape[:-1], y2.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = _bwd(dy, x2, weight, rstd, None, ctx.needs_input_grad[1])
        return dx.view(ctx.x_shape), dw, None


class AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        s2, y2, rstd = _fwd(x, residual, weight, eps)
        ctx.save_for_backward(s2, weight, rstd)
        ctx.dtypes, ctx.shape = (x.dtype, residual.dtype), x.shape
        return s2.view(x.shape), y2.view(x.shape)

    @staticmethod
    def backward(ctx, ds, dy):
        s2, weight, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(s2)
        dsum, dw = _bwd(dy, s2, weight, rstd, ds, ctx.needs_input_grad[2])
        dsum = dsum.view(ctx.shape)
        dx = dsum.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        dr = dsum.to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return dx, dr, dw, None


def _check(x, weight, what):
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{what}: weight must be [{x.shape[-1]}]; got {tuple(weight.shape)}")
    if not x.is_cuda and not INTERPRET:
        raise RuntimeError(f"{what}: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1)")


def rms_norm_triton(x, weight, eps=1e-6):
    _check(x, weight, "rms_norm")
    return RMSNormFunction.apply(x, weight.contiguous(), eps)


def add_rms_norm_triton(x, residual, weight, eps=1e-6):
    _check(x, weight, "add_rms_norm")
    if x.shape != residual.shape:
        raise ValueError(f"add_rms_norm: x {tuple(x.shape)} and residual {tuple(residual.shape)} must have one shape")
    return AddRMSNormFunction.apply(x, residual, weight.contiguous(), eps)
