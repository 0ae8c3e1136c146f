"""Triton row kernels of the chunked linear cross-entropy (kernels/linear_ce.py): per-row
statistics of one logits block, and the softmax gradient written over the logits in place.
Both read the logits in their own dtype (no fp32 copy of the [chunk, vocab] block) and loop over
the vocabulary in BLOCK_V columns; one program per row.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _ce_stats(X, TGT, M, S, T, n_cols, sx, BLOCK_V: tl.constexpr):
    """m = max_j x_j, s = sum_j exp(x_j - m), t = x[tgt] (0 when tgt is outside [0, n_cols))."""
    row = tl.program_id(0).to(tl.int64)
    base = X + row * sx
    tgt = tl.load(TGT + row)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], dtype=tl.float32)
    t = tl.zeros([], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        inb = cols < n_cols
        x = tl.load(base + cols, mask=inb, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))  # finite from the first block on (column 0 is real)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        t += tl.sum(tl.where((cols == tgt) & inb, x, 0.0), axis=0)
    tl.store(M + row, m)
    tl.store(S + row, s)
    tl.store(T + row, t)


@triton.jit
def _ce_grad(X, TGT, LSE, SCALE, n_cols, sx, BLOCK_V: tl.constexpr):
    """In place: x <- (exp(x - lse) - onehot(tgt)) * scale (scale 0 on ignored rows)."""
    row = tl.program_id(0).to(tl.int64)
    base = X + row * sx
    tgt = tl.load(TGT + row)
    lse = tl.load(LSE + row)
    sc = tl.load(SCALE + row)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        inb = cols < n_cols
        x = tl.load(base + cols, mask=inb, other=0.0).to(tl.float32)
        p = tl.exp(x - lse)
        p = tl.where(cols == tgt, p - 1.0, p) * sc
        tl.store(base + cols, p.to(X.dtype.element_ty), mask=inb)


def _block_v(n_cols: int) -> int:
    return min(triton.next_power_of_2(max(n_cols, 1)), 1024 if INTERPRET else 4096)


def stats(x: torch.Tensor, tgt: torch.Tensor):
    rows, n = x.shape
    m = torch.empty(rows, dtype=torch.float32, device=x.device)
    s, t = torch.empty_like(m), torch.empty_like(m)
    if rows:
        _ce_stats[(rows,)](x, tgt, m, s, t, n, x.stride(0), BLOCK_V=_block_v(n), num_warps=8)
    return m, s, t


def grad_(x: torch.Tensor, tgt: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor) -> None:
    rows, n = x.shape
    if rows:
        _ce_grad[(rows,)](x, tgt, lse, scale, n, x.stride(0), BLOCK_V=_block_v(n), num_warps=8)
