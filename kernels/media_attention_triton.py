"""Triton cross-attention specialised to the Flamingo mask, forward and backward.

Mask: query i sees key j iff text_time[b, i] == media_segment[b, j] -- exactly
`attention(q, k, v, q_segment=text_time, kv_segment=media_segment)`; a query that sees nothing
outputs exactly 0 and gets zero gradient. Layout and GQA as in flash_attention.py, whose tile
helpers (`_fwd_tile`, `_dq_tile`, `_dkdv_tile`), configs and launch cache this module reuses.
(Not named media_attention.py: that submodule would shadow the package's function of that name.)

Range tables (torch, no host sync, exact for any integer ids): one stable sort of each row's key
ids (`key_ranges`, forward) and of its query ids (`query_ranges`, backward only), and
searchsorted of each side into the other's sorted ids. Per query: its value's first index in
the sorted keys (`qid`, -1 when no key has the value) and one past its last (`q_hi`); per key:
its own value's first index (`kid`) and the range of that value in the sorted queries (`k_lo`,
`k_hi`). A stable sort keeps equal ids in position order, so
perm[first] and perm[last] are the first and last positions holding the value. qid and kid are
compact ids (equal iff the values are), which the kernels compare instead of the raw values.

What is exploited: Flamingo keys are a few contiguous spans of `num_latents` (one per image) and
a query block holds one or two text_time values, so
  forward, dQ  (grid: query blocks)  loop only over [first key of any of the block's values, last
               key of any of them] -- usually one or two spans, never a scan of all key blocks;
  dK/dV        (grid: key blocks)    loop only over the queries whose value one of the block's
               keys carries -- the text of one or two images, not all of Lq.
The span covers every matching pair for any layout (a block's min first / max last position);
non-contiguous layouts only make it longer. Tiles are masked by id equality as in the general
kernel. dQ computes delta = rowsum(dO * O) itself and stores it for dK/dV, which runs after it
(one fewer pass over O and dO than a separate delta kernel).

With `span=n` (keys in aligned spans of n, one id each, no query id on two spans: the model's
latents) the backward is one pass instead (`_media_bwd_span`): each query sees one span at most,
so the program of a span owns its keys' dK/dV and its queries' dQ outright -- q, o, dO read once,
dq written once, no atomics (`_media_bwd_blind_dq` zeroes the dQ of queries that see nothing).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .flash_attention import (_DTYPE_KEY, AUTOTUNE, INTERPRET, _LOG2E, _bucket, _bwd_configs, _dkdv_tile, _dq_tile,
                              _fwd_configs, _fwd_tile, _launcher, _prune, _query_block)
from .flash_attention import _meta as _general_meta
from .reference import check_shapes

_KEY = ["Q_BUCKET", "K_BUCKET", "BLOCK_D", "GROUP", "DTYPE_KEY"]


@triton.jit
def _span(LO_row, HI_row, PERM_row, offs, n, n_other):
    """[start, end) of the other side's positions that the elements at offs (< n) can match: the
    min first and max last position of their values (LO/HI: a value's run in the other side's
    sorted ids, LO < 0 or LO == HI for none; PERM: that sort's permutation). Also returns LO."""
    inb = offs < n
    lo = tl.load(LO_row + offs, mask=inb, other=-1)
    hi = tl.load(HI_row + offs, mask=inb, other=0)
    hit = (lo >= 0) & (hi > lo)
    first = tl.load(PERM_row + tl.where(hit, lo, 0), mask=hit, other=0).to(tl.int32)
    last = tl.load(PERM_row + tl.where(hit, hi - 1, 0), mask=hit, other=0).to(tl.int32)
    start = tl.min(tl.where(hit, first, n_other), axis=0)
    end = tl.max(tl.where(hit, last + 1, 0), axis=0)
    return lo, start, end


@triton.autotune(configs=_fwd_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune},
                 cache_results=True)
@triton.jit
def _media_fwd(
    Q, K, V, O, LSE, QID, QHI, KID, KPERM,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    H, Lq, Lk, D, qk_scale,
    Q_BUCKET, K_BUCKET, DTYPE_KEY,
    GROUP: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh, b, h, hk, _, offs_m, offs_d, mmask, dmask = _query_block(H, GROUP, Lq, D, BLOCK_M, BLOCK_D)

    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
                mask=mmask[:, None] & dmask[None, :], other=0.0)
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    qs, lo, hi = _span(QID + b * Lq, QHI + b * Lq, KPERM + b * Lk, offs_m, Lq, Lk)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # `hi` stands in for Lk in the tiles: keys past the span are never loaded
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ks = tl.load(KID + b * Lk + offs_n, mask=offs_n < hi, other=-2)
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, qs, ks, k_base, v_base, s_kn, s_kd, s_vn, s_vd,
                                  offs_m, offs_d, dmask, start_n, Lq, hi, qk_scale,
                                  True, False, True, DOT_PREC, BLOCK_N)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(O + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od,
             out.to(O.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * Lq + offs_m, lse, mask=mmask)


@triton.autotune(configs=_bwd_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune},
                 cache_results=True)
@triton.jit
def _media_bwd_dq(
    Q, K, V, O, DO, LSE, DELTA, DQ, QID, QHI, KID, KPERM,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    s_db, s_dh, s_dm, s_dd,
    s_dqb, s_dqh, s_dqm, s_dqd,
    H, Lq, Lk, D, qk_scale, sm_scale,
    Q_BUCKET, K_BUCKET, DTYPE_KEY,
    GROUP: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh, b, h, hk, _, offs_m, offs_d, mmask, dmask = _query_block(H, GROUP, Lq, D, BLOCK_M, BLOCK_D)
    qd_mask = mmask[:, None] & dmask[None, :]

    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd, mask=qd_mask, other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + offs_m[:, None] * s_dm + offs_d[None, :] * s_dd, mask=qd_mask, other=0.0)
    o = tl.load(O + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od, mask=qd_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    row = pid_bh.to(tl.int64) * Lq
    tl.store(DELTA + row + offs_m, delta, mask=mmask)  # read by the dK/dV kernel, launched after this one
    lse = tl.load(LSE + row + offs_m, mask=mmask, other=float("inf"))
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    qs, lo, hi = _span(QID + b * Lq, QHI + b * Lq, KPERM + b * Lk, offs_m, Lq, Lk)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ks = tl.load(KID + b * Lk + offs_n, mask=offs_n < hi, other=-2)
        dq = _dq_tile(dq, q, do, lse, delta, qs, ks, k_base, v_base, s_kn, s_kd, s_vn, s_vd,
                      offs_m, offs_d, dmask, start_n, Lq, hi, qk_scale,
                      True, False, True, DOT_PREC, BLOCK_N)
    dq = dq * sm_scale
    tl.store(DQ + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dqm + offs_d[None, :] * s_dqd,
             dq.to(DQ.dtype.element_ty), mask=qd_mask)


@triton.autotune(configs=_bwd_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune},
                 cache_results=True)
@triton.jit
def _media_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, QID, KID, KLO, KHI, QPERM,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_db, s_dh, s_dm, s_dd,
    s_dkb, s_dkh, s_dkn, s_dkd,
    s_dvb, s_dvh, s_dvn, s_dvd,
    H, Hkv, Lq, Lk, D, qk_scale, sm_scale,
    Q_BUCKET, K_BUCKET, DTYPE_KEY,
    GROUP: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nmask = offs_n < Lk
    dmask = offs_d < D
    kvmask = nmask[:, None] & dmask[None, :]

    k = tl.load(K + b * s_kb + hk * s_kh + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=kvmask, other=0.0)
    v = tl.load(V + b * s_vb + hk * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=kvmask, other=0.0)
    ks = tl.load(KID + b * Lk + offs_n, mask=nmask, other=-2)
    _, lo, hi = _span(KLO + b * Lk, KHI + b * Lk, QPERM + b * Lq, offs_n, Lk, Lq)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    qid_row = QID + b * Lq
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + b * s_qb + h * s_qh
        do_base = DO + b * s_db + h * s_dh
        row = (b * H + h) * Lq
        for start_m in range(lo, hi, BLOCK_M):  # `hi` for Lq: queries past the span are never loaded
            dk, dv = _dkdv_tile(dk, dv, k, v, ks, q_base, do_base, LSE + row, DELTA + row, qid_row,
                                s_qm, s_qd, s_dm, s_dd, offs_n, offs_d, dmask, start_m, hi, Lk, qk_scale,
                                True, False, True, DOT_PREC, BLOCK_M)

    dk = dk * sm_scale
    tl.store(DK + b * s_dkb + hk * s_dkh + offs_n[:, None] * s_dkn + offs_d[None, :] * s_dkd,
             dk.to(DK.dtype.element_ty), mask=kvmask)
    tl.store(DV + b * s_dvb + hk * s_dvh + offs_n[:, None] * s_dvn + offs_d[None, :] * s_dvd,
             dv.to(DV.dtype.element_ty), mask=kvmask)


# The one-pass backward for span-aligned keys (`span=n`): one program per (span, kv head) owns
# its n keys in one tile. Configs set BLOCK_M only; BLOCK_N is the span's tile (host side).
def _span_cfg(bm, warps, stages):
    return triton.Config({"BLOCK_M": bm}, num_warps=warps, num_stages=stages)


_SPAN_CONFIGS = [_span_cfg(64, 4, 2), _span_cfg(64, 8, 2), _span_cfg(128, 8, 2), _span_cfg(32, 4, 2),
                 _span_cfg(32, 4, 1)]
_SPAN_KEY = ["Q_BUCKET", "K_BUCKET", "BLOCK_D", "BLOCK_N", "GROUP", "DTYPE_KEY"]


def _span_configs():
    if INTERPRET:
        return [_span_cfg(16, 4, 1)]
    return _SPAN_CONFIGS if AUTOTUNE else _SPAN_CONFIGS[:1]


def _prune_span(configs, named_args, **kwargs):
    """`_prune` for the span kernel: its resident K/V tile is BLOCK_N x BLOCK_D, and each query
    block streams q, o, dO."""
    q = named_args.get("Q")
    esize = q.element_size() if hasattr(q, "element_size") else 2
    block_d, block_n = kwargs.get("BLOCK_D", 64), kwargs.get("BLOCK_N", 64)
    kept = [c for c in configs
            if (3 * c.kwargs["BLOCK_M"] * max(1, c.num_stages) + 2 * block_n) * block_d * esize <= 160 * 1024]
    kept = kept or configs[-1:]
    lq = named_args.get("Q_BUCKET")
    cap_m = max(lq or 0, min(c.kwargs["BLOCK_M"] for c in kept))
    return [c for c in kept if c.kwargs["BLOCK_M"] <= cap_m] or kept[-1:]


@triton.autotune(configs=_span_configs(), key=_SPAN_KEY, prune_configs_by={"early_config_prune": _prune_span},
                 cache_results=True)
@triton.jit
def _media_bwd_span(
    Q, K, V, O, DO, LSE, DQ, DK, DV, QID, KID, KLO, KHI, QPERM,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    s_db, s_dh, s_dm, s_dd,
    s_dqb, s_dqh, s_dqm, s_dqd,
    s_dkb, s_dkh, s_dkn, s_dkd,
    s_dvb, s_dvh, s_dvn, s_dvd,
    H, Hkv, Lq, Lk, D, SPAN, qk_scale, sm_scale,
    Q_BUCKET, K_BUCKET, DTYPE_KEY,
    GROUP: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dQ, dK, dV in one pass when keys come in aligned spans of SPAN keys with one id each and
    no query id reaches two spans (the `span=` promise): the program of span s and kv head hk
    loops over the queries of the span's id (every query head of the GQA group), accumulates the
    span's dK/dV, and computes each query's dQ in full -- its only keys are this span -- so dQ
    is stored once, without atomics. delta = rowsum(dO * O) is formed from the rows it loads."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    start_n = pid_s * SPAN
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nmask = offs_n < start_n + SPAN
    dmask = offs_d < D
    kvmask = nmask[:, None] & dmask[None, :]

    k = tl.load(K + b * s_kb + hk * s_kh + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=kvmask, other=0.0)
    v = tl.load(V + b * s_vb + hk * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=kvmask, other=0.0)
    span_id = tl.load(KID + b * Lk + start_n)  # compact id of every key of the span
    _, lo, hi = _span(KLO + b * Lk, KHI + b * Lk, QPERM + b * Lq, offs_n, start_n + SPAN, Lq)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + b * s_qb + h * s_qh
        o_base = O + b * s_ob + h * s_oh
        do_base = DO + b * s_db + h * s_dh
        dq_base = DQ + b * s_dqb + h * s_dqh
        row = (b * H + h) * Lq
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            # rows of other ids in the block belong to another span's program (or see nothing)
            mine = tl.load(QID + b * Lq + offs_m, mask=offs_m < hi, other=-1) == span_id
            rmask = mine[:, None] & dmask[None, :]
            q = tl.load(q_base + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd, mask=rmask, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * s_dm + offs_d[None, :] * s_dd, mask=rmask, other=0.0)
            o = tl.load(o_base + offs_m[:, None] * s_om + offs_d[None, :] * s_od, mask=rmask, other=0.0)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
            lse = tl.load(LSE + row + offs_m, mask=mine, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            p = tl.where(mine[:, None] & nmask[None, :], tl.exp2(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
            dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC) * sm_scale
            tl.store(dq_base + offs_m[:, None] * s_dqm + offs_d[None, :] * s_dqd, dq.to(DQ.dtype.element_ty),
                     mask=rmask)

    tl.store(DK + b * s_dkb + hk * s_dkh + offs_n[:, None] * s_dkn + offs_d[None, :] * s_dkd,
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kvmask)
    tl.store(DV + b * s_dvb + hk * s_dvh + offs_n[:, None] * s_dvn + offs_d[None, :] * s_dvd,
             dv.to(DV.dtype.element_ty), mask=kvmask)


@triton.jit
def _media_bwd_blind_dq(
    DQ, QID, s_dqb, s_dqh, s_dqm, s_dqd, H, Lq, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ = 0 on the queries no key matches (qid < 0): no span program visits them. Writes only
    those rows, so with the span kernel every dQ row is written exactly once."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < Lq
    blind = tl.load(QID + b * Lq + offs_m, mask=mmask, other=0) < 0
    tl.store(DQ + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dqm + offs_d[None, :] * s_dqd,
             tl.zeros([BLOCK_M, BLOCK_D], tl.float32).to(DQ.dtype.element_ty),
             mask=(blind & mmask)[:, None] & (offs_d < D)[None, :])


# ----------------------------------------------------------------------------------------------
# host side


def key_ranges(text_time: torch.Tensor, media_segment: torch.Tensor) -> dict[str, torch.Tensor]:
    """The forward's and dQ's tables (module docstring): qid, q_hi [B, Lq], kid [B, Lk] (int32)
    and kperm [B, Lk] (int64, the stable sort of the key ids)."""
    k_sorted, kperm = torch.sort(media_segment, dim=1, stable=True)
    q_lo = torch.searchsorted(k_sorted, text_time, out_int32=True)
    q_hi = torch.searchsorted(k_sorted, text_time, right=True, out_int32=True)
    return dict(qid=torch.where(q_hi > q_lo, q_lo, -1), q_hi=q_hi,
                kid=torch.searchsorted(k_sorted, media_segment, out_int32=True), kperm=kperm)


def query_ranges(text_time: torch.Tensor, media_segment: torch.Tensor) -> dict[str, torch.Tensor]:
    """dK/dV's tables, built in the backward only: k_lo, k_hi [B, Lk] (int32) and qperm [B, Lq]
    (int64, the stable sort of the query ids)."""
    q_sorted, qperm = torch.sort(text_time, dim=1, stable=True)
    return dict(k_lo=torch.searchsorted(q_sorted, media_segment, out_int32=True),
                k_hi=torch.searchsorted(q_sorted, media_segment, right=True, out_int32=True), qperm=qperm)


def _ids(s: torch.Tensor) -> torch.Tensor:
    return s.to(torch.int64).contiguous()  # one dtype for sort / searchsorted; no copy for the model's


def _meta(q, k):
    return _general_meta(q, k, False, None)  # shapes, tiles, precision: the general kernel's


def _tune_key(m, q):
    return (_bucket(m["lq"]), _bucket(m["lk"]), m["block_d"], m["group"], m["dkey"], q.dtype)


def _forward(q, k, v, t, sm_scale):
    m = _meta(q, k)
    o = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty((m["b"], m["h"], m["lq"]), device=q.device, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(m["lq"], meta["BLOCK_M"]), m["b"] * m["h"])

    _launcher(_media_fwd, "fwd", grid, _tune_key(m, q))(
        q, k, v, o, lse, t["qid"], t["q_hi"], t["kid"], t["kperm"],
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        m["h"], m["lq"], m["lk"], m["d"], sm_scale * _LOG2E,
        _bucket(m["lq"]), _bucket(m["lk"]), m["dkey"],
        GROUP=m["group"], DOT_PREC=m["dot_prec"], BLOCK_D=m["block_d"],
    )
    return o, lse


def _backward(do, q, k, v, o, lse, t, sm_scale):
    m = _meta(q, k)
    delta = torch.empty_like(lse)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(GROUP=m["group"], DOT_PREC=m["dot_prec"], BLOCK_D=m["block_d"])
    keys = (_bucket(m["lq"]), _bucket(m["lk"]), m["dkey"])

    def grid_q(meta):
        return (triton.cdiv(m["lq"], meta["BLOCK_M"]), m["b"] * m["h"])

    _launcher(_media_bwd_dq, "bwd", grid_q, _tune_key(m, q))(
        q, k, v, o, do, lse, delta, dq, t["qid"], t["q_hi"], t["kid"], t["kperm"],
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dq.stride(),
        m["h"], m["lq"], m["lk"], m["d"], sm_scale * _LOG2E, sm_scale, *keys, **common,
    )

    def grid_kv(meta):
        return (triton.cdiv(m["lk"], meta["BLOCK_N"]), m["b"] * m["hkv"])

    _launcher(_media_bwd_dkdv, "bwd", grid_kv, _tune_key(m, q))(
        q, k, v, do, lse, delta, dk, dv, t["qid"], t["kid"], t["k_lo"], t["k_hi"], t["qperm"],
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        m["h"], m["hkv"], m["lq"], m["lk"], m["d"], sm_scale * _LOG2E, sm_scale, *keys, **common,
    )
    return dq, dk, dv


# The span kernel keeps a span's K, V, dK, dV resident, as the general dK/dV kernel keeps its key
# block's: at most its tile at head dim 128 (64 x 128 elements). Longer spans (128 latents at
# head dim 128) take the two-kernel backward.
SPAN_TILE_MAX = 64 * 128


def span_tile(span: int, d: int) -> int | None:
    """BLOCK_N of the one-pass backward for spans of `span` keys at head dim d, or None when the
    span is too long for one resident tile (the two-kernel backward runs)."""
    block_n = max(16, triton.next_power_of_2(span))
    return block_n if block_n * max(16, triton.next_power_of_2(d)) <= SPAN_TILE_MAX else None


def assert_spans(media_segment, span, kid, kperm, k_lo, k_hi):
    """The `span=` promise, checked on the device without a host sync (torch._assert_async: on
    CUDA a failure surfaces at a later launch and ends the process's CUDA context; on CPU it
    raises here): every aligned run of `span` keys carries one id, and an id that some query
    carries is on one span only (padding media, -1 on several spans, has no query)."""
    b, lk = media_segment.shape
    spans = media_segment.view(b, lk // span, span)
    first = spans[:, :, 0].contiguous()
    keys_of_id = torch.searchsorted(media_segment.gather(1, kperm), first, right=True) - kid[:, ::span]
    has_text = (k_hi > k_lo)[:, ::span]
    ok = (spans == first[:, :, None]).all(2) & ((keys_of_id == span) | ~has_text)
    torch._assert_async(ok.all(), f"media_attention: span={span} promised, but media_segment is not made of "
                                  f"aligned runs of {span} keys with one id each, one span per id that text carries")


def _backward_span(do, q, k, v, o, lse, t, sm_scale, span, block_n):
    m = _meta(q, k)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    blk = 16 if INTERPRET else 64
    _media_bwd_blind_dq[(triton.cdiv(m["lq"], blk), m["b"] * m["h"])](
        dq, t["qid"], *dq.stride(), m["h"], m["lq"], m["d"], BLOCK_M=blk, BLOCK_D=m["block_d"])

    grid = (m["lk"] // span, m["b"] * m["hkv"])
    key = (*_tune_key(m, q), block_n)
    _launcher(_media_bwd_span, "span", grid, key)(
        q, k, v, o, do, lse, dq, dk, dv, t["qid"], t["kid"], t["k_lo"], t["k_hi"], t["qperm"],
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dq.stride(), *dk.stride(), *dv.stride(),
        m["h"], m["hkv"], m["lq"], m["lk"], m["d"], span, sm_scale * _LOG2E, sm_scale,
        _bucket(m["lq"]), _bucket(m["lk"]), m["dkey"],
        GROUP=m["group"], DOT_PREC=m["dot_prec"], BLOCK_D=m["block_d"], BLOCK_N=block_n,
    )
    return dq, dk, dv


class MediaAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, text_time, media_segment, scale, span):
        tt, ms = _ids(text_time), _ids(media_segment)
        t = key_ranges(tt, ms)
        o, lse = _forward(q, k, v, t, scale)
        ctx.save_for_backward(q, k, v, o, lse, tt, ms, t["qid"], t["q_hi"], t["kid"], t["kperm"])
        ctx.scale = scale
        ctx.span = span
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, tt, ms, qid, q_hi, kid, kperm = ctx.saved_tensors
        t = dict(qid=qid, q_hi=q_hi, kid=kid, kperm=kperm, **query_ranges(tt, ms))
        block_n = span_tile(ctx.span, q.shape[-1]) if ctx.span else None
        if block_n is None:
            dq, dk, dv = _backward(do, q, k, v, o, lse, t, ctx.scale)
        else:
            assert_spans(ms, ctx.span, kid, kperm, t["k_lo"], t["k_hi"])
            dq, dk, dv = _backward_span(do, q, k, v, o, lse, t, ctx.scale, ctx.span, block_n)
        return dq, dk, dv, None, None, None, None


def media_attention_triton(q, k, v, text_time, media_segment, *, scale=None, span=None):
    """Flamingo cross-attention (Triton). Same contract as `furnace_kernels.media_attention`.
    `span=n`: the caller's promise that the keys come in aligned runs of n with one id each and
    that no query's id is on two runs (`assert_spans` checks it on the device); the backward then
    takes one pass (`_media_bwd_span`). Without it, or for spans too long for one tile
    (`span_tile`), the two-kernel backward."""
    check_shapes(q, k, v, text_time, media_segment)
    if q.dtype not in _DTYPE_KEY or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"media_attention_triton: q, k, v must share one of fp16/bf16/fp32; "
                        f"got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, s in (("text_time", text_time), ("media_segment", media_segment)):
        if s.dtype.is_floating_point or s.dtype.is_complex or s.dtype == torch.bool:
            raise TypeError(f"media_attention: {name} must be an integer tensor; got {s.dtype}")
        if s.device != q.device:
            raise ValueError(f"media_attention: {name} is on {s.device}, q is on {q.device}")
    if not q.is_cuda and not INTERPRET:
        raise RuntimeError("media_attention_triton needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
    if span is not None and (int(span) != span or span < 1 or k.shape[2] % span):
        raise ValueError(f"media_attention: span={span} must be a positive integer dividing the keys' length "
                         f"{k.shape[2]}")
    sm_scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if q.shape[0] == 0 or q.shape[2] == 0 or k.shape[2] == 0:
        return q * 0.0  # nothing to attend to: zeros, and zero gradients through the multiply
    span = None if span is None else int(span)
    return MediaAttentionFunction.apply(q, k, v, text_time, media_segment, sm_scale, span)


__all__ = ["media_attention_triton", "key_ranges", "query_ranges", "assert_spans", "span_tile",
           "MediaAttentionFunction"]
