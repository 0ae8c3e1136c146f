"""Triton flash attention with causal and segment masks, GQA, forward and backward.

Mask (same as kernels/reference.py): query i sees key j iff
  (not causal or j <= i + (Lk - Lq))        # bottom-right aligned causal
  and (no segments or q_segment[b, i] == kv_segment[b, j]).
A query that sees no key outputs exactly 0 and gets zero gradient.

Layout: q [B, H, Lq, D], k/v [B, Hkv, Lk, D] (any strides), Hkv divides H; query head h reads
kv head h // (H // Hkv) (no repeated K/V is materialised).

Algorithm (online softmax, nothing of size Lq x Lk is ever stored):
  forward   grid (Lq blocks, B*H): running max m (starts at -inf), running sum l and
            accumulator; scores in the log2 domain (scale * log2 e folded in). Saves
            lse2 = m + log2(l) per query, or +inf for a query that saw nothing, so that in the
            backward p = exp2(s - lse2) is exactly 0 on such rows.
  backward  delta = rowsum(dO * O) (small kernel), then two atomic-free kernels:
            dK/dV: grid (Lk blocks, B*Hkv), loops over the query heads of the GQA group and
                   over query blocks;
            dQ:    grid (Lq blocks, B*H), loops over key blocks.

Block skipping (conservative): a (query block, key block) pair is skipped -- its K/V (or Q/dO)
tiles are never loaded -- when
  * causal: the first key of the key block is after the last key the last query of the query
    block may see (j_first > i_last + Lk - Lq); this is applied through the loop bounds;
  * segments: the key block's segment range [min, max] and the query block's range do not
    intersect (kv_max < q_min or kv_min > q_max). Only the segment ids (4 bytes per token) are
    read to decide. Ranges are exact for Flamingo (text_time is non-decreasing along a row and
    each image's latents are contiguous) and for packed documents; for arbitrary segment
    layouts the test is still correct, only less effective.
Without segments, tiles that all queries of the block see entirely run without mask arithmetic
(the "full" loops); only diagonal / ragged tiles take the masked path.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os

import torch
import triton
import triton.language as tl

from .reference import check_shapes

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_LOG2E = 1.4426950408889634


def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# Small lists on purpose: every config of every autotune key is compiled and timed once.
_FWD_CONFIGS = [_cfg(128, 64, 8, 3), _cfg(128, 64, 4, 2), _cfg(64, 64, 4, 3), _cfg(128, 32, 4, 3), _cfg(64, 32, 4, 2)]
_BWD_CONFIGS = [_cfg(64, 64, 4, 2), _cfg(64, 64, 8, 3), _cfg(32, 64, 4, 2), _cfg(64, 32, 4, 3), _cfg(128, 64, 8, 2),
                _cfg(32, 32, 4, 1)]


# FURNACE_ATTN_AUTOTUNE=0 (read at import): one config per kernel instead of the lists above. The
# GPU tests use it: autotuning compiles every config for every mask/dtype/head-dim combination,
# minutes on a fresh machine; tests/test_kernels_attention.py::test_every_config checks each listed config through
# `forced_configs` instead.
AUTOTUNE = os.environ.get("FURNACE_ATTN_AUTOTUNE", "1") != "0"
_ONE_CONFIG = _cfg(64, 32, 4, 2)  # fits shared memory for fp32 at head dim 128


def _fwd_configs():
    if INTERPRET:  # the interpreter cannot benchmark several configs
        return [_cfg(16, 16, 4, 1)]
    return _FWD_CONFIGS if AUTOTUNE else [_ONE_CONFIG]


def _bwd_configs():
    if INTERPRET:
        return [_cfg(16, 16, 4, 1)]
    return _BWD_CONFIGS if AUTOTUNE else [_ONE_CONFIG]


_forced = {"fwd": None, "bwd": None, "span": None}


@contextlib.contextmanager
def forced_configs(fwd: triton.Config | None = None, bwd: triton.Config | None = None,
                   span: triton.Config | None = None):
    """Launch the forward (and the two backward kernels) with these configs, bypassing the
    autotuner, so that a test can check every config the autotuner may pick. `span`: the media
    kernel's one-pass backward (media_attention_triton.py), whose configs set BLOCK_M only."""
    saved = dict(_forced)
    _forced.update(fwd=fwd, bwd=bwd, span=span)
    try:
        yield
    finally:
        _forced.update(saved)


# (kernel name, its autotune key) -> the config the autotuner picked. Once a shape has been tuned,
# its launches skip the autotuner's per-call work (an argument dict, a key built over every
# argument) and go straight to the JIT function with the picked meta-parameters.
_picked: dict[tuple, triton.Config] = {}


def picked_configs() -> dict[tuple, triton.Config]:
    """What the autotuner chose so far, per (kernel, key): the launch cache (read-only view)."""
    return dict(_picked)


# Pinned configs: the winners of a multi-repeat tune per device (benchmarks/tune_attention.py),
# because the autotuner times each config once on a noisy clock and may pick differently on
# every run. A JSON file {"configs": {device name: [entry, ...]}}, entry = {"kernel", "head_dim"
# (BLOCK_D), "causal", "segments", "dtype", "BLOCK_M", "BLOCK_N", "num_warps", "num_stages"};
# read from FURNACE_ATTN_CONFIGS, else the table shipped beside this file.
PINNED_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "attention_configs.json")


def _device_name(t: torch.Tensor) -> str:
    return _cuda_name(t.device.index if t.device.index is not None else torch.cuda.current_device()) \
        if t.is_cuda else "interpreter"


@functools.cache
def _cuda_name(index: int) -> str:  # asked on every launch: the driver query once per device
    return torch.cuda.get_device_name(index)


@functools.cache
def _pinned_table(path: str, device: str) -> dict[tuple, triton.Config]:
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            entries = json.load(f)["configs"].get(device, [])
        return {(e["kernel"], int(e["head_dim"]), bool(e["causal"]), bool(e["segments"]), e["dtype"]):
                _cfg(int(e["BLOCK_M"]), int(e["BLOCK_N"]), int(e["num_warps"]), int(e["num_stages"]))
                for e in entries}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"attention: pinned config table {path} is unreadable ({type(e).__name__}: {e}); "
                         "rewrite it with benchmarks/tune_attention.py or unset FURNACE_ATTN_CONFIGS") from None


def pinned_config(kernel_name: str, key: tuple, q: torch.Tensor) -> triton.Config | None:
    """The pinned config for a launch of one of this file's kernels (`_tune_key`'s key), if any."""
    table = _pinned_table(os.environ.get("FURNACE_ATTN_CONFIGS", PINNED_FILE), _device_name(q))
    if not table:
        return None
    _, _, block_d, _, causal, has_seg, _, dtype = key
    return table.get((kernel_name, block_d, bool(causal), bool(has_seg), str(dtype).removeprefix("torch.")))


def _launcher(kernel, which: str, grid, key: tuple, q: torch.Tensor | None = None):
    """A launch of `kernel` on `grid`: with the forced config's meta (`forced_configs`), the
    config pinned for this device (`pinned_config`, given `q`), the config picked for `key`
    before, or through the autotuner (its pick is then cached)."""
    cfg = _forced[which]
    if cfg is None and q is not None:
        cfg = pinned_config(kernel.fn.__name__, key, q)
    if cfg is None:
        cfg = _picked.get((kernel.fn.__name__, key))
    if cfg is not None:
        launch = kernel.fn[grid]
        return lambda *args, **kw: launch(*args, **kw, **cfg.all_kwargs())

    def tune_and_launch(*args, **kw):
        out = kernel[grid](*args, **kw)
        _picked[(kernel.fn.__name__, key)] = kernel.best_config
        return out

    return tune_and_launch


def _prune(configs, named_args, **kwargs):
    """Drops tiles that cannot fit in shared memory for wide fp32 heads, and tiles longer than
    the sequence (a 64-row tile over 12 queries is the 32-row tile's work plus padding: compiling
    and timing it only delays the first step). Keeps at least one config."""
    q = named_args.get("Q")
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
    esize = q.element_size() if hasattr(q, "element_size") else 2
    budget = 160 * 1024
    kept = [c for c in configs
            if (c.kwargs["BLOCK_M"] + 2 * c.kwargs["BLOCK_N"]) * block_d * esize * max(1, c.num_stages) <= budget]
    kept = kept or configs[-1:]
    lq, lk = named_args.get("Q_BUCKET"), named_args.get("K_BUCKET")
    if lq is None or lk is None:
        return kept
    cap_m = max(lq, min(c.kwargs["BLOCK_M"] for c in kept))
    cap_n = max(lk, min(c.kwargs["BLOCK_N"] for c in kept))
    short = [c for c in kept if c.kwargs["BLOCK_M"] <= cap_m and c.kwargs["BLOCK_N"] <= cap_n]
    return short or kept[-1:]


_KEY = ["Q_BUCKET", "K_BUCKET", "BLOCK_D", "GROUP", "CAUSAL", "HAS_SEG", "DTYPE_KEY"]


@triton.jit
def _query_block(H, GROUP, Lq, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """What a program of a (query blocks, B*H) grid works on: its row pid_bh = b*H + h, batch b,
    query head h and kv head (GQA), the block's first query, query and head-dim offsets and masks."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_m = tl.program_id(0) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    return pid_bh, b, h, h // GROUP, start_m, offs_m, offs_d, offs_m < Lq, offs_d < D


@triton.jit
def _seg_range(SEG, offs, n):
    """(min, max) of the segment ids at offs (< n); padding lanes are ignored."""
    inb = offs < n
    s = tl.load(SEG + offs, mask=inb, other=0)
    smin = tl.min(tl.where(inb, s, 2147483647), axis=0)
    smax = tl.max(tl.where(inb, s, -2147483648), axis=0)
    return s, smin, smax


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, qs, ks, k_base, v_base, s_kn, s_kd, s_vn, s_vd,
              offs_m, offs_d, dmask, start_n, Lq, Lk, qk_scale,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, DOT_PREC: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """One key tile of the forward. MASKED=False: every key of the tile is visible to every
    query of the block (no bounds, causal or segment test needed)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    nmask = offs_n < Lk
    if MASKED:
        kv_mask = nmask[:, None] & dmask[None, :]
    else:
        kv_mask = dmask[None, :]
    k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if MASKED:
        valid = nmask[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + (Lk - Lq))
        if HAS_SEG:
            valid = valid & (qs[:, None] == ks[None, :])
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # rows that have seen nothing yet keep m = -inf; use 0 as the shift so that
    # exp2(-inf - 0) = 0 instead of exp2(-inf + inf) = NaN
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.autotune(configs=_fwd_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune},
                 cache_results=True)
@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, QSEG, KSEG,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    H, Lq, Lk, D, qk_scale,
    Q_BUCKET, K_BUCKET, DTYPE_KEY,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh, b, h, hk, start_m, offs_m, offs_d, mmask, dmask = _query_block(H, GROUP, Lq, D, BLOCK_M, BLOCK_D)

    q_ptr = Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd
    q = tl.load(q_ptr, mask=mmask[:, None] & dmask[None, :], other=0.0)
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # key range [0, hi) that some query of the block may see; [0, full_hi) is seen by all of them
    hi = Lk
    full_hi = (Lk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        last_q = tl.minimum(start_m + BLOCK_M, Lq) - 1
        hi = tl.maximum(tl.minimum(Lk, last_q + (Lk - Lq) + 1), 0)
        first_horizon = tl.maximum(start_m + (Lk - Lq) + 1, 0)  # keys seen by the block's first query
        full_hi = tl.minimum((first_horizon // BLOCK_N) * BLOCK_N, hi)

    if HAS_SEG:
        qs, qmin, qmax = _seg_range(QSEG + b * Lq, offs_m, Lq)
        for start_n in range(0, hi, BLOCK_N):
            ks, kmin, kmax = _seg_range(KSEG + b * Lk, start_n + tl.arange(0, BLOCK_N), Lk)
            if (kmin <= qmax) & (kmax >= qmin):  # else: skipped, K/V never loaded
                acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, qs, ks, k_base, v_base, s_kn, s_kd, s_vn, s_vd,
                                          offs_m, offs_d, dmask, start_n, Lq, Lk, qk_scale,
                                          True, CAUSAL, HAS_SEG, DOT_PREC, BLOCK_N)
    else:
        for start_n in range(0, full_hi, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, offs_m, offs_m, k_base, v_base, s_kn, s_kd, s_vn, s_vd,
                                      offs_m, offs_d, dmask, start_n, Lq, Lk, qk_scale,
                                      False, CAUSAL, HAS_SEG, DOT_PREC, BLOCK_N)
        for start_n in range(full_hi, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, offs_m, offs_m, k_base, v_base, s_kn, s_kd, s_vn, s_vd,
                                      offs_m, offs_d, dmask, start_n, Lq, Lk, qk_scale,
                                      True, CAUSAL, HAS_SEG, DOT_PREC, BLOCK_N)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    o_ptr = O + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * Lq + offs_m, lse, mask=mmask)


@triton.jit
def _attn_bwd_delta(
    O, DO, DELTA,
    s_ob, s_oh, s_om, s_od,
    s_db, s_dh, s_dm, s_dd,
    H, Lq, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    msk = (offs_m[:, None] < Lq) & (offs_d[None, :] < D)
    o = tl.load(O + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od, mask=msk, other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + offs_m[:, None] * s_dm + offs_d[None, :] * s_dd, mask=msk, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + pid_bh.to(tl.int64) * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _dkdv_tile(dk, dv, k, v, ks, q_base, do_base, LSE_row, DELTA_row, QSEG_row,
               s_qm, s_qd, s_dm, s_dd, offs_n, offs_d, dmask, start_m, Lq, Lk, qk_scale,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, DOT_PREC: tl.constexpr,
               BLOCK_M: tl.constexpr):
    """One query tile of the dK/dV pass. MASKED=False: all queries of the tile see all keys of
    the block (query rows past Lq load lse = +inf, so they contribute p = 0)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    mmask = offs_m < Lq
    qd_mask = mmask[:, None] & dmask[None, :]
    q = tl.load(q_base + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd, mask=qd_mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * s_dm + offs_d[None, :] * s_dd, mask=qd_mask, other=0.0)
    lse = tl.load(LSE_row + offs_m, mask=mmask, other=float("inf"))
    delta = tl.load(DELTA_row + offs_m, mask=mmask, other=0.0)
    # transposed scores: [BLOCK_N, BLOCK_M]
    sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
    pT = tl.exp2(sT - lse[None, :])
    if MASKED:
        valid = (offs_n[:, None] < Lk) & mmask[None, :]
        if CAUSAL:
            valid = valid & (offs_n[:, None] <= offs_m[None, :] + (Lk - Lq))
        if HAS_SEG:
            qs = tl.load(QSEG_row + offs_m, mask=mmask, other=0)
            valid = valid & (ks[:, None] == qs[None, :])
        pT = tl.where(valid, pT, 0.0)
    dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    dsT = pT * (dpT - delta[None, :])
    dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.autotune(configs=_bwd_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune},
                 cache_results=True)
@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, QSEG, KSEG,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_db, s_dh, s_dm, s_dd,
    s_dkb, s_dkh, s_dkn, s_dkd,
    s_dvb, s_dvh, s_dvn, s_dvd,
    H, Hkv, Lq, Lk, D, qk_scale, sm_scale,
    Q_BUCKET, K_BUCKET, DTYPE_KEY,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nmask = offs_n < Lk
    dmask = offs_d < D
    kvmask = nmask[:, None] & dmask[None, :]

    k = tl.load(K + b * s_kb + hk * s_kh + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=kvmask, other=0.0)
    v = tl.load(V + b * s_vb + hk * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=kvmask, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # query blocks [lo, Lq) may see this key block; [full_lo, Lq) see all of its keys
    lo = 0
    full_lo = 0
    if CAUSAL:
        # the first query that may see key start_n is i = start_n - (Lk - Lq)
        lo = (tl.maximum(start_n - (Lk - Lq), 0) // BLOCK_M) * BLOCK_M
        last_key = tl.minimum(start_n + BLOCK_N, Lk) - 1
        first_all = tl.maximum(last_key - (Lk - Lq), 0)  # first query that sees every key of the block
        full_lo = tl.maximum(((first_all + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, lo)
    if not CAUSAL:
        # without causality only a partial key block (keys past Lk) needs the mask; that is
        # handled by never storing those rows, so every query tile is unmasked
        full_lo = 0
    qseg_row = QSEG + b * Lq
    if HAS_SEG:
        ks, kmin, kmax = _seg_range(KSEG + b * Lk, offs_n, Lk)
    else:
        ks = offs_n
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + b * s_qb + h * s_qh
        do_base = DO + b * s_db + h * s_dh
        row_base = (b * H + h) * Lq
        if HAS_SEG:
            for start_m in range(lo, Lq, BLOCK_M):
                qs, qmin, qmax = _seg_range(qseg_row, start_m + tl.arange(0, BLOCK_M), Lq)
                if (kmin <= qmax) & (kmax >= qmin):  # else: skipped, Q/dO never loaded
                    dk, dv = _dkdv_tile(dk, dv, k, v, ks, q_base, do_base, LSE + row_base, DELTA + row_base, qseg_row,
                                        s_qm, s_qd, s_dm, s_dd, offs_n, offs_d, dmask, start_m, Lq, Lk, qk_scale,
                                        True, CAUSAL, HAS_SEG, DOT_PREC, BLOCK_M)
        else:
            for start_m in range(lo, full_lo, BLOCK_M):
                dk, dv = _dkdv_tile(dk, dv, k, v, ks, q_base, do_base, LSE + row_base, DELTA + row_base, qseg_row,
                                    s_qm, s_qd, s_dm, s_dd, offs_n, offs_d, dmask, start_m, Lq, Lk, qk_scale,
                                    True, CAUSAL, HAS_SEG, DOT_PREC, BLOCK_M)
            for start_m in range(full_lo, Lq, BLOCK_M):
                dk, dv = _dkdv_tile(dk, dv, k, v, ks, q_base, do_base, LSE + row_base, DELTA + row_base, qseg_row,
                                    s_qm, s_qd, s_dm, s_dd, offs_n, offs_d, dmask, start_m, Lq, Lk, qk_scale,
                                    False, CAUSAL, HAS_SEG, DOT_PREC, BLOCK_M)

    dk = dk * sm_scale
    tl.store(DK + b * s_dkb + hk * s_dkh + offs_n[:, None] * s_dkn + offs_d[None, :] * s_dkd,
             dk.to(DK.dtype.element_ty), mask=kvmask)
    tl.store(DV + b * s_dvb + hk * s_dvh + offs_n[:, None] * s_dvn + offs_d[None, :] * s_dvd,
             dv.to(DV.dtype.element_ty), mask=kvmask)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, qs, ks, k_base, v_base, s_kn, s_kd, s_vn, s_vd,
             offs_m, offs_d, dmask, start_n, Lq, Lk, qk_scale,
             MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, DOT_PREC: tl.constexpr,
             BLOCK_N: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    nmask = offs_n < Lk
    if MASKED:
        kv_mask = nmask[:, None] & dmask[None, :]
    else:
        kv_mask = dmask[None, :]
    k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    p = tl.exp2(s - lse[:, None])
    if MASKED:
        valid = nmask[None, :] & (offs_m[:, None] < Lq)
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + (Lk - Lq))
        if HAS_SEG:
            valid = valid & (qs[:, None] == ks[None, :])
        p = tl.where(valid, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.autotune(configs=_bwd_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune},
                 cache_results=True)
@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, QSEG, KSEG,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_db, s_dh, s_dm, s_dd,
    s_dqb, s_dqh, s_dqm, s_dqd,
    H, Lq, Lk, D, qk_scale, sm_scale,
    Q_BUCKET, K_BUCKET, DTYPE_KEY,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh, b, h, hk, start_m, offs_m, offs_d, mmask, dmask = _query_block(H, GROUP, Lq, D, BLOCK_M, BLOCK_D)
    qd_mask = mmask[:, None] & dmask[None, :]

    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd, mask=qd_mask, other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + offs_m[:, None] * s_dm + offs_d[None, :] * s_dd, mask=qd_mask, other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * Lq + offs_m, mask=mmask, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * Lq + offs_m, mask=mmask, other=0.0)
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = Lk
    full_hi = (Lk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        last_q = tl.minimum(start_m + BLOCK_M, Lq) - 1
        hi = tl.maximum(tl.minimum(Lk, last_q + (Lk - Lq) + 1), 0)
        first_horizon = tl.maximum(start_m + (Lk - Lq) + 1, 0)
        full_hi = tl.minimum((first_horizon // BLOCK_N) * BLOCK_N, hi)
    if HAS_SEG:
        qs, qmin, qmax = _seg_range(QSEG + b * Lq, offs_m, Lq)
        for start_n in range(0, hi, BLOCK_N):
            ks, kmin, kmax = _seg_range(KSEG + b * Lk, start_n + tl.arange(0, BLOCK_N), Lk)
            if (kmin <= qmax) & (kmax >= qmin):  # else: skipped, K/V never loaded
                dq = _dq_tile(dq, q, do, lse, delta, qs, ks, k_base, v_base, s_kn, s_kd, s_vn, s_vd,
                              offs_m, offs_d, dmask, start_n, Lq, Lk, qk_scale,
                              True, CAUSAL, HAS_SEG, DOT_PREC, BLOCK_N)
    else:
        for start_n in range(0, full_hi, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse, delta, offs_m, offs_m, k_base, v_base, s_kn, s_kd, s_vn, s_vd,
                          offs_m, offs_d, dmask, start_n, Lq, Lk, qk_scale,
                          False, CAUSAL, HAS_SEG, DOT_PREC, BLOCK_N)
        for start_n in range(full_hi, hi, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse, delta, offs_m, offs_m, k_base, v_base, s_kn, s_kd, s_vn, s_vd,
                          offs_m, offs_d, dmask, start_n, Lq, Lk, qk_scale,
                          True, CAUSAL, HAS_SEG, DOT_PREC, BLOCK_N)

    dq = dq * sm_scale
    tl.store(DQ + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dqm + offs_d[None, :] * s_dqd,
             dq.to(DQ.dtype.element_ty), mask=qd_mask)


# ----------------------------------------------------------------------------------------------
# host side

_DTYPE_KEY = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


def _bucket(n: int) -> int:
    """Autotune key for a length: next power of two (so variable text lengths share configs)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def _prep_segments(q_segment, kv_segment, device):
    if q_segment is None:
        return None, None
    for name, s in (("q_segment", q_segment), ("kv_segment", kv_segment)):
        if s.dtype.is_floating_point or s.dtype == torch.bool or s.dtype.is_complex:
            raise TypeError(f"attention: {name} must be an integer tensor; got {s.dtype}")
        if s.device != device:
            raise ValueError(f"attention: {name} is on {s.device}, q is on {device}")
    return q_segment.to(torch.int32).contiguous(), kv_segment.to(torch.int32).contiguous()


def _meta(q, k, causal, qseg):
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if d > 256:
        raise ValueError(f"attention: head dim {d} > 256 is not supported by the Triton kernel")
    return dict(
        b=b, h=h, hkv=hkv, lq=lq, lk=lk, d=d, group=h // hkv,
        block_d=max(16, triton.next_power_of_2(d)),
        causal=bool(causal), has_seg=qseg is not None,
        dot_prec="ieee" if q.dtype == torch.float32 else "tf32",
        dkey=_DTYPE_KEY.get(q.dtype, 3),
    )


def _tune_key(m: dict, q: torch.Tensor) -> tuple:
    """What the autotuner keys a launch on (`_KEY`, and the tensors' dtype it appends), from
    `_meta`: a launch with an equal key reuses the config picked for it."""
    return (_bucket(m["lq"]), _bucket(m["lk"]), m["block_d"], m["group"], m["causal"], m["has_seg"], m["dkey"],
            q.dtype)


def _forward(q, k, v, qseg, kseg, causal, sm_scale):
    m = _meta(q, k, causal, qseg)
    o = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty((m["b"], m["h"], m["lq"]), device=q.device, dtype=torch.float32)
    segq = qseg if qseg is not None else lse  # dummy pointer when HAS_SEG is False
    segk = kseg if kseg is not None else lse

    def grid(meta):
        return (triton.cdiv(m["lq"], meta["BLOCK_M"]), m["b"] * m["h"])

    _launcher(_attn_fwd, "fwd", grid, _tune_key(m, q), q)(
        q, k, v, o, lse, segq, segk,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        m["h"], m["lq"], m["lk"], m["d"], sm_scale * _LOG2E,
        _bucket(m["lq"]), _bucket(m["lk"]), m["dkey"],
        GROUP=m["group"], CAUSAL=m["causal"], HAS_SEG=m["has_seg"], DOT_PREC=m["dot_prec"],
        BLOCK_D=m["block_d"],
    )
    return o, lse


def _backward(do, q, k, v, o, lse, qseg, kseg, causal, sm_scale):
    m = _meta(q, k, causal, qseg)
    delta = torch.empty_like(lse)
    blk = 16 if INTERPRET else 64
    _attn_bwd_delta[(triton.cdiv(m["lq"], blk), m["b"] * m["h"])](
        o, do, delta, *o.stride(), *do.stride(), m["h"], m["lq"], m["d"],
        BLOCK_M=blk, BLOCK_D=m["block_d"],
    )
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    segq = qseg if qseg is not None else lse
    segk = kseg if kseg is not None else lse
    common = dict(GROUP=m["group"], CAUSAL=m["causal"], HAS_SEG=m["has_seg"], DOT_PREC=m["dot_prec"],
                  BLOCK_D=m["block_d"])
    keys = (_bucket(m["lq"]), _bucket(m["lk"]), m["dkey"])

    def grid_kv(meta):
        return (triton.cdiv(m["lk"], meta["BLOCK_N"]), m["b"] * m["hkv"])

    _launcher(_attn_bwd_dkdv, "bwd", grid_kv, _tune_key(m, q), q)(
        q, k, v, do, lse, delta, dk, dv, segq, segk,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        m["h"], m["hkv"], m["lq"], m["lk"], m["d"], sm_scale * _LOG2E, sm_scale,
        *keys, **common,
    )

    def grid_q(meta):
        return (triton.cdiv(m["lq"], meta["BLOCK_M"]), m["b"] * m["h"])

    _launcher(_attn_bwd_dq, "bwd", grid_q, _tune_key(m, q), q)(
        q, k, v, do, lse, delta, dq, segq, segk,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        m["h"], m["lq"], m["lk"], m["d"], sm_scale * _LOG2E, sm_scale,
        *keys, **common,
    )
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_segment, kv_segment, causal, scale):
        o, lse = _forward(q, k, v, q_segment, kv_segment, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse, q_segment, kv_segment)
        ctx.causal = causal
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, qseg, kseg = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, qseg, kseg, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None, None


def attention_triton(q, k, v, *, causal=False, q_segment=None, kv_segment=None, scale=None):
    """Flash attention (Triton). Same contract as `furnace_kernels.attention`."""
    check_shapes(q, k, v, q_segment, kv_segment)
    if q.dtype not in _DTYPE_KEY or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"attention_triton: q, k, v must share one of fp16/bf16/fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.is_cuda and not INTERPRET:
        raise RuntimeError("attention_triton needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
    qseg, kseg = _prep_segments(q_segment, kv_segment, q.device)
    sm_scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    b, h, lq, d = q.shape
    lk = k.shape[2]
    if lq == 0 or lk == 0 or b == 0:
        # nothing to attend to: zeros (and zero gradients through the multiply)
        return q * 0.0
    return FlashAttentionFunction.apply(q, k, v, qseg, kseg, bool(causal), sm_scale)


__all__ = ["attention_triton", "FlashAttentionFunction", "forced_configs", "picked_configs", "pinned_config"]
