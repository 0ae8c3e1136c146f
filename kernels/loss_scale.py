"""Fused loss scaling: one multi-tensor read pass for (squared norm, non-finite flag), a dynamic
loss scaler with DeepSpeed's semantics, and one multiply for unscale x clip. (The hook that
drives them inside DeepSpeed's ZeRO-3 optimizer is `furnace.parallel.zero3`.)

    sumsq, nonfinite = grad_stats(tensors, inv_scale)
        sumsq     fp32 0-dim tensor: sum over all elements of (g * inv_scale)^2 (accumulated in
                  fp32 per block, blocks summed in fp64); inf/NaN when an element is non-finite
                  or the sum overflows fp32.
        nonfinite bool 0-dim tensor: some element of some tensor is inf or NaN.
    apply_(tensors, factor)   in-place g *= factor (factor: float or 0-dim tensor), one pass.

Backend (kernels/backend.py, op "loss_scale"): Triton on CUDA tensors (or anywhere with
backend="triton" under TRITON_INTERPRET=1), the torch reference elsewhere; `set_backend` or a
per-call `backend=` overrides.
"""
from __future__ import annotations

import math
import os
from typing import Iterable, Sequence

import torch

from .backend import use_triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _use_triton(tensors: Sequence[torch.Tensor], backend: str | None) -> bool:
    return use_triton("loss_scale", tensors[0] if tensors else None, backend)


# ----------------------------------------------------------------------------------------------
# Triton multi-tensor kernels. A launch covers all tensors of one dtype: program p handles chunk p
# (CHUNK = BLOCK * ITERS elements of one tensor). Tensors are addressed relative to the first one
# (element offset = (addr_i - addr_0) / itemsize), so the kernel sees ordinary typed pointers.

_tl_kernels = None


def _kernels():
    global _tl_kernels
    if _tl_kernels is not None:
        return _tl_kernels
    import triton
    import triton.language as tl

    @triton.jit
    def _mt_stats(BASE, REL, NUMEL, CHUNK_T, CHUNK_S, PART_SQ, PART_NF, inv_scale,
                  ALIGN: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
        pid = tl.program_id(0)
        t = tl.load(CHUNK_T + pid)
        start = tl.load(CHUNK_S + pid)
        n = tl.load(NUMEL + t)
        rel = tl.load(REL + t)
        if ALIGN > 1:
            rel = tl.multiple_of(rel, ALIGN)
        ptr = BASE + rel
        acc = tl.zeros([BLOCK], tl.float32)
        bad = tl.zeros([BLOCK], tl.int32)
        for i in tl.static_range(ITERS):
            offs = start + i * BLOCK + tl.arange(0, BLOCK)
            m = offs < n
            x = tl.load(ptr + offs, mask=m, other=0.0).to(tl.float32)
            bad = bad | ((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32)
            y = x * inv_scale
            acc += y * y
        tl.store(PART_SQ + pid, tl.sum(acc, axis=0))
        tl.store(PART_NF + pid, tl.max(bad, axis=0))

    @triton.jit
    def _mt_scale(BASE, REL, NUMEL, CHUNK_T, CHUNK_S, FACTOR,
                  ALIGN: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
        pid = tl.program_id(0)
        t = tl.load(CHUNK_T + pid)
        start = tl.load(CHUNK_S + pid)
        n = tl.load(NUMEL + t)
        rel = tl.load(REL + t)
        if ALIGN > 1:
            rel = tl.multiple_of(rel, ALIGN)
        ptr = BASE + rel
        f = tl.load(FACTOR)
        for i in tl.static_range(ITERS):
            offs = start + i * BLOCK + tl.arange(0, BLOCK)
            m = offs < n
            x = tl.load(ptr + offs, mask=m, other=0.0)
            tl.store(ptr + offs, (x.to(tl.float32) * f).to(x.dtype), mask=m)

    _tl_kernels = (_mt_stats, _mt_scale)
    return _tl_kernels


def _chunk_params(element_size: int) -> tuple[int, int, int]:
    """(BLOCK, ITERS, num_warps). GPU: 64 KB per program whatever the dtype, 32 bytes per thread
    per iteration, 8 independent iterations, so that each program has many loads in flight and
    its four dependent table loads are amortised. On an H100 (one run each), grad_stats went from
    35% to 53% of copy bandwidth in fp16 and from 75% to 66% in fp32 against 4 x 1024 elements per
    program (benchmarks/results/h100-notes.md). Interpreter: small chunks."""
    if INTERPRET:
        return 256, 2, 4
    warps = 8
    block = 32 // element_size * 32 * warps
    return block, 8, warps


class _Plan:
    """Chunk table for one list of same-dtype tensors (cached on their addresses and sizes)."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.block, self.iters, self.warps = _chunk_params(tensors[0].element_size())
        block, iters = self.block, self.iters
        dev = tensors[0].device
        isz = tensors[0].element_size()
        base_addr = tensors[0].data_ptr()
        rel, numel, counts = [], [], []
        align_bytes = 16
        for t in tensors:
            d = t.data_ptr() - base_addr
            assert d % isz == 0
            rel.append(d // isz)
            numel.append(t.numel())
            counts.append(-(-t.numel() // (block * iters)))
            while align_bytes > isz and (t.data_ptr() % align_bytes):
                align_bytes //= 2
        self.base = tensors[0]
        self.align = max(1, align_bytes // isz)
        self.rel = torch.tensor(rel, dtype=torch.int64, device=dev)
        self.numel = torch.tensor(numel, dtype=torch.int64, device=dev)
        cnt = torch.tensor(counts, dtype=torch.int64)
        self.n_chunks = int(cnt.sum())
        chunk_t = torch.repeat_interleave(torch.arange(len(tensors), dtype=torch.int32), cnt)
        first = torch.cumsum(cnt, 0) - cnt
        chunk_i = torch.arange(self.n_chunks, dtype=torch.int64) - torch.repeat_interleave(first, cnt)
        self.chunk_t = chunk_t.to(dev)
        self.chunk_s = (chunk_i * (block * iters)).to(dev)


_plan_cache: dict = {}


def _plans(tensors: Sequence[torch.Tensor]) -> list[_Plan]:
    groups: dict = {}
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        if not t.is_contiguous():
            raise ValueError("grad_stats/apply_: tensors must be contiguous")
        groups.setdefault((t.dtype, t.device), []).append(t)
    plans = []
    for key, ts in groups.items():
        ck = (key, INTERPRET, tuple((t.data_ptr(), t.numel()) for t in ts))
        p = _plan_cache.get(ck)
        if p is None:
            if len(_plan_cache) > 64:
                _plan_cache.clear()
            p = _plan_cache[ck] = _Plan(ts)
        p.base = ts[0]  # the base tensor must be the live one passed now
        plans.append(p)
    return plans


def _grad_stats_triton(tensors, inv_scale):
    plans = _plans(tensors)
    if not plans:
        dev = tensors[0].device if tensors else "cpu"
        return torch.zeros((), dtype=torch.float32, device=dev), torch.zeros((), dtype=torch.bool, device=dev)
    mt_stats, _ = _kernels()
    dev = plans[0].base.device
    total = sum(p.n_chunks for p in plans)
    part_sq = torch.empty(total, dtype=torch.float32, device=dev)
    part_nf = torch.empty(total, dtype=torch.int32, device=dev)
    off = 0
    for p in plans:
        mt_stats[(p.n_chunks,)](
            p.base, p.rel, p.numel, p.chunk_t, p.chunk_s, part_sq[off:], part_nf[off:], float(inv_scale),
            ALIGN=p.align, BLOCK=p.block, ITERS=p.iters, num_warps=p.warps,
        )
        off += p.n_chunks
    sumsq = part_sq.sum(dtype=torch.float64).to(torch.float32)
    return sumsq, part_nf.amax() > 0


def _grad_stats_torch(tensors, inv_scale):
    ts = [t for t in tensors if t is not None and t.numel() > 0]
    if not ts:
        dev = tensors[0].device if tensors else "cpu"
        return torch.zeros((), dtype=torch.float32, device=dev), torch.zeros((), dtype=torch.bool, device=dev)
    sumsq = torch.zeros((), dtype=torch.float64, device=ts[0].device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=ts[0].device)
    for t in ts:
        x = t.float()
        nonfinite |= ~torch.isfinite(x).all()
        sumsq += (x * inv_scale).square().sum()
    return sumsq.to(torch.float32), nonfinite


def grad_stats(tensors: Iterable[torch.Tensor], inv_scale: float = 1.0, *, backend: str | None = None):
    """(sum of squares of tensors * inv_scale as an fp32 0-dim tensor, non-finite flag as a bool 0-dim tensor).

    One read of every element. Tensors may have different sizes and dtypes (one launch per dtype).
    """
    tensors = [t for t in tensors if t is not None]
    if _use_triton(tensors, backend):
        return _grad_stats_triton(tensors, inv_scale)
    return _grad_stats_torch(tensors, inv_scale)


def apply_(tensors: Iterable[torch.Tensor], factor, *, backend: str | None = None) -> None:
    """In place: every tensor *= factor (float or 0-dim tensor), one pass over the data."""
    tensors = [t for t in tensors if t is not None and t.numel() > 0]
    if not tensors:
        return
    if not _use_triton(tensors, backend):
        if torch.is_tensor(factor):
            for t in tensors:
                t.mul_(factor.to(t.device))
        else:
            torch._foreach_mul_(tensors, float(factor))
        return
    _, mt_scale = _kernels()
    for p in _plans(tensors):
        f = factor if torch.is_tensor(factor) else torch.tensor(float(factor))
        f = f.to(device=p.base.device, dtype=torch.float32).reshape(1)
        mt_scale[(p.n_chunks,)](p.base, p.rel, p.numel, p.chunk_t, p.chunk_s, f,
                                ALIGN=p.align, BLOCK=p.block, ITERS=p.iters, num_warps=p.warps)


# ----------------------------------------------------------------------------------------------
# Dynamic loss scaler (DeepSpeed's semantics, deepspeed/runtime/fp16/loss_scaler.py)


class DynamicLossScaler:
    """Dynamic loss scale with DeepSpeed's rules:

    * overflow: if hysteresis == 1 or the remaining hysteresis is 1, scale = max(scale * backoff,
      min_scale) (raise if already at min_scale and raise_error_at_min_scale); otherwise only the
      remaining hysteresis drops by one. The step is skipped either way.
    * no overflow: with consecutive_hysteresis the remaining hysteresis refills; after
      growth_interval steps since the last overflow the scale grows by growth_factor (and,
      without consecutive_hysteresis, the hysteresis refills then).

    Attribute names match DeepSpeed's scaler (cur_scale, cur_iter, last_overflow_iter,
    cur_hysteresis, delayed_shift, scale_window, ...) so it can replace it inside a DeepSpeed
    optimizer and be checkpointed with it.
    """

    dynamic = True

    def __init__(self, init_scale: float = 2.0**16, *, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 1000, hysteresis: int = 2, consecutive_hysteresis: bool = False,
                 min_scale: float = 1.0, raise_error_at_min_scale: bool = True, dtype=torch.float16):
        self.cur_scale = float(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.scale_window = int(growth_interval)
        self.delayed_shift = int(hysteresis)
        self.cur_hysteresis = int(hysteresis)
        self.consecutive_hysteresis = bool(consecutive_hysteresis)
        self.min_scale = float(min_scale)
        self.raise_error_at_min_scale = raise_error_at_min_scale
        self.cur_iter = 0
        self.last_overflow_iter = -1
        self.dtype = dtype

    # DeepSpeed-compatible surface
    @property
    def loss_scale(self) -> float:
        return self.cur_scale

    @property
    def scale_factor(self) -> float:
        return self.growth_factor

    def scale_gradient(self, module, grad_in, grad_out):
        return tuple(self.loss_scale * g for g in grad_in)

    def scale_loss(self, loss):
        return loss * self.loss_scale

    def backward(self, loss, retain_graph=False):
        self.scale_loss(loss).backward(retain_graph=retain_graph)

    def update_scale(self, overflow: bool) -> bool:
        """Advance one step; returns True when the step must be skipped (== overflow)."""
        overflow = bool(overflow)
        if overflow:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                if self.cur_scale == self.min_scale and self.raise_error_at_min_scale:
                    raise RuntimeError("loss scale already at its minimum; cannot decrease it further")
                self.cur_scale = max(self.cur_scale * self.backoff_factor, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.delayed_shift
            stable = (self.cur_iter - self.last_overflow_iter) - 1
            if stable > 0 and stable % self.scale_window == 0:
                if not self.consecutive_hysteresis:
                    self.cur_hysteresis = self.delayed_shift
                self.cur_scale *= self.growth_factor
        self.cur_iter += 1
        return overflow

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")}

    def load_state_dict(self, sd: dict) -> None:
        for k, v in sd.items():
            setattr(self, k, v)


def clip_factor(sumsq_unscaled: float, max_norm: float) -> float:
    """DeepSpeed's clip: divide by max(1, (norm + 1e-6) / max_norm); returns the multiplier."""
    if max_norm <= 0:
        return 1.0
    return 1.0 / max(1.0, (math.sqrt(sumsq_unscaled) + 1e-6) / max_norm)


def unscale_clip_(tensors: Sequence[torch.Tensor], scaler: "DynamicLossScaler | None" = None, max_norm: float = 0.0,
                  *, loss_scale: float | None = None, group=None, backend: str | None = None):
    """The whole fused step outside DeepSpeed: one grad_stats pass, one all-reduce of
    [sumsq, nonfinite] over `group` (when torch.distributed is initialised), the scaler update,
    and, unless the step overflowed, one multiply by 1 / (scale * clip).

    Returns (skip, grad_norm): skip is True when the step must be skipped (gradients left as
    they are); grad_norm is the unscaled global norm (inf when skipped).
    """
    tensors = [t for t in tensors if t is not None]
    scale = float(scaler.cur_scale if scaler is not None else (loss_scale or 1.0))
    sumsq, nonfinite = grad_stats(tensors, 1.0 / scale, backend=backend)
    buf = torch.stack([sumsq.to(torch.float32), nonfinite.to(torch.float32)])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(buf, group=group)
    s, nf = buf.tolist()
    overflow = nf > 0 or not math.isfinite(s)
    if scaler is not None:
        scaler.update_scale(overflow)
    if overflow:
        return True, float("inf")
    norm = math.sqrt(s)
    apply_(tensors, clip_factor(s, max_norm) / scale, backend=backend)
    return False, norm
