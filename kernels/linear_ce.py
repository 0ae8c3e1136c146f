"""Linear + cross-entropy without the [tokens x vocabulary] logits.

    loss_sum, count = linear_cross_entropy(hidden, weights, labels, ignore_index=-100, chunk=None,
                                           group=None, vocab_start=0, replicated=None)

The logits are cat([hidden @ W_i^T for W_i in weights], -1): several weight blocks (the LM head,
Flamingo's new-token rows) are concatenated logically, never in memory. Tokens are processed
`chunk` rows at a time: the chunk's logits (in the input dtype, as the model's head computes
them), the log-sum-exp in fp32, and, when a gradient is wanted, the softmax gradient written
over the logits and multiplied straight into d_hidden and each trainable block's d_weight (fp32
accumulators), all inside the forward. The backward only scales them by the incoming gradient.
Peak extra memory: O(chunk x vocabulary) plus the gradients themselves (no logits recompute).

Vocab-parallel (`group` with more than one rank): block i holds vocabulary ids
[vocab_start_i, vocab_start_i + rows_i) (vocab_start: one int, blocks contiguous from it, or one
int per block); the sharded blocks of all ranks partition the vocabulary. Per chunk, the max is
all-reduced (MAX), then the sum of exponentials and the target logit (SUM). Blocks flagged in
`replicated` (the same rows on every rank, like furnace's new-token head under tensor
parallelism) join after the all-reduce, counted once. The loss is the unsplit loss on every rank;
d_hidden is all-reduced too (the sharded part; the replicated part is the same everywhere), so it
equals the unsplit gradient: pass the replicated hidden state, not one already behind a
copy-to-tensor-parallel mapping. d_weight is each rank's own rows.

Row math (max / sum-exp / target pick, and the in-place softmax gradient) runs in Triton
(linear_ce_triton.py) or in torch, per kernels/backend.py's "linear_cross_entropy" op.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

_BUDGET = 1 << 26  # logits elements per chunk by default (128 MiB of bf16)


def _stats_torch(x, tgt):
    xf = x.float()
    m = xf.amax(1)
    s = (xf - m[:, None]).exp().sum(1)
    own = (tgt >= 0) & (tgt < x.shape[1])
    t = xf.gather(1, tgt.clamp(0, x.shape[1] - 1)[:, None]).squeeze(1).masked_fill(~own, 0.0)
    return m, s, t


def _grad_torch_(x, tgt, lse, scale):
    p = (x.float() - lse[:, None]).exp()
    own = (tgt >= 0) & (tgt < x.shape[1])
    p.scatter_add_(1, tgt.clamp(0, x.shape[1] - 1)[:, None], -own.float()[:, None])
    x.copy_(p * scale[:, None])


def _row_ops(triton_rows: bool, device: torch.device):
    if triton_rows:
        from .linear_ce_triton import INTERPRET, grad_, stats  # imports triton: only where it runs

        if device.type != "cuda" and not INTERPRET:
            raise RuntimeError("linear_cross_entropy: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")
        return stats, grad_
    return _stats_torch, _grad_torch_


def _combine(parts):
    """(m, s, t) of several column blocks -> one (the sums rescaled to the common max). A part
    with m = -inf (an empty slice) contributes nothing, and never exp(-inf - -inf) = NaN."""
    if len(parts) == 1:
        return parts[0]
    m = parts[0][0]
    for p in parts[1:]:
        m = torch.maximum(m, p[0])
    s = sum(torch.where(p[0] == float("-inf"), 0.0, p[1] * torch.exp(p[0] - m)) for p in parts)
    t = sum(p[2] for p in parts)
    return m, s, t


def _acc_mm(out_f32, a, b):
    """out_f32 += a @ b, accumulated in fp32 whatever the operands' dtype."""
    if a.dtype == torch.float32:
        out_f32.addmm_(a, b)
    else:
        out_f32.add_(a @ b)


def _run(hidden, labels, weights, starts, replicated, ignore_index, chunk, group, triton_rows, need_dh, need_dw):
    """(loss_sum fp32, d_hidden fp32 or None, [d_weight fp32 or None]) for gradient scale 1."""
    n, d = hidden.shape
    dev = hidden.device
    stats, grad_ = _row_ops(triton_rows, dev)
    world = dist.get_world_size(group) if group is not None and dist.is_available() and dist.is_initialized() else 1
    sharded = [i for i, w in enumerate(weights) if not (world > 1 and replicated[i])]
    reps = [i for i in range(len(weights)) if i not in sharded]
    # every rank must run the same collectives: decide from the structure, not from local sizes
    collective = world > 1 and bool(sharded)
    need_grad = need_dh or any(need_dw)
    loss = torch.zeros((), dtype=torch.float32, device=dev)
    dh = torch.zeros((n, d), dtype=torch.float32, device=dev) if need_dh else None
    dh_rep = torch.zeros_like(dh) if need_dh and collective and reps else None
    dws = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need else None
           for w, need in zip(weights, need_dw)]
    for c0 in range(0, n, chunk):
        h = hidden[c0:c0 + chunk]
        lab = labels[c0:c0 + chunk]
        valid = lab != ignore_index
        logits = [F.linear(h, w) if w.shape[0] else None for w in weights]
        tgts = [torch.where(valid, lab - start, -1) for start in starts]  # -1: not in this block
        parts = {i: stats(x, tgts[i]) for i, x in enumerate(logits) if x is not None}
        local = [parts[i] for i in sharded if i in parts]
        if not local:  # this rank holds no rows: it adds nothing to the all-reduced sums
            z = torch.zeros(h.shape[0], device=dev)
            local = [(torch.full_like(z, float("-inf")), z, z)]
        m, s, t = _combine(local)
        if collective:
            m_all = m.clone()
            dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=group)
            st_sum = torch.stack([s * torch.exp(m - m_all), t])
            dist.all_reduce(st_sum, group=group)
            m, s, t = m_all, st_sum[0], st_sum[1]
        if reps:
            m, s, t = _combine([(m, s, t)] + [parts[i] for i in reps if i in parts])
        lse = m + torch.log(s)
        loss += torch.where(valid, lse - t, 0.0).sum()
        if not need_grad:
            continue
        scale = valid.float()
        for i, x in enumerate(logits):
            if x is None:
                continue
            grad_(x, tgts[i], lse, scale)  # x now holds d loss / d logits
            if need_dh:
                _acc_mm((dh_rep if i in reps and dh_rep is not None else dh)[c0:c0 + chunk], x, weights[i])
            if dws[i] is not None:
                _acc_mm(dws[i], x.t(), h)
        del logits
    if need_dh and collective:
        dist.all_reduce(dh, group=group)
        if dh_rep is not None:
            dh += dh_rep
    return loss, dh, dws


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, labels, spec, *weights):
        starts, replicated, ignore_index, chunk, group, triton_rows = spec
        need_dh = ctx.needs_input_grad[0]
        need_dw = [ctx.needs_input_grad[3 + i] for i in range(len(weights))]
        loss, dh, dws = _run(hidden, labels, weights, starts, replicated, ignore_index, chunk, group, triton_rows,
                             need_dh, need_dw)
        ctx.dtypes = (hidden.dtype, [w.dtype for w in weights])
        ctx.has = (dh is not None, [g is not None for g in dws])
        ctx.save_for_backward(*([dh] if dh is not None else []), *[g for g in dws if g is not None])
        return loss

    @staticmethod
    def backward(ctx, g):
        saved = list(ctx.saved_tensors)
        has_dh, has_dw = ctx.has
        dh = saved.pop(0).mul(g).to(ctx.dtypes[0]) if has_dh else None
        dws = [saved.pop(0).mul(g).to(dt) if h else None for h, dt in zip(has_dw, ctx.dtypes[1])]
        return (dh, None, None, *dws)


def _spec(weights, vocab_start, replicated):
    ws = [weights] if torch.is_tensor(weights) else list(weights)
    if not ws:
        raise ValueError("linear_cross_entropy: give at least one weight matrix")
    if isinstance(vocab_start, int):
        starts, at = [], vocab_start
        for w in ws:
            starts.append(at)
            at += w.shape[0]
    else:
        starts = [int(v) for v in vocab_start]
    reps = [False] * len(ws) if replicated is None else [bool(r) for r in replicated]
    if len(starts) != len(ws) or len(reps) != len(ws):
        raise ValueError(f"linear_cross_entropy: {len(ws)} weight blocks but {len(starts)} vocab_start "
                         f"values and {len(reps)} replicated flags")
    return ws, starts, reps


def default_chunk(n_tokens: int, vocab: int) -> int:
    c = max(1, min(n_tokens, _BUDGET // max(vocab, 1)))
    return c - c % 128 if c >= 256 else c


def linear_cross_entropy_chunked(hidden, weights, labels, *, ignore_index=-100, chunk=None, group=None,
                                 vocab_start=0, replicated=None, triton_rows=False):
    ws, starts, reps = _spec(weights, vocab_start, replicated)
    d = hidden.shape[-1]
    for w in ws:
        if w.dim() != 2 or w.shape[1] != d:
            raise ValueError(f"linear_cross_entropy: weights must be [rows, {d}]; got {tuple(w.shape)}")
    h2 = hidden.reshape(-1, d)
    lab = labels.reshape(-1).to(torch.int64)
    if lab.shape[0] != h2.shape[0]:
        raise ValueError(f"linear_cross_entropy: {h2.shape[0]} hidden rows but {lab.shape[0]} labels")
    chunk = int(chunk) if chunk else default_chunk(h2.shape[0], sum(w.shape[0] for w in ws))
    spec = (starts, reps, ignore_index, chunk, group, triton_rows)
    count = (lab != ignore_index).sum()
    if torch.is_grad_enabled() and (hidden.requires_grad or any(w.requires_grad for w in ws)):
        return LinearCrossEntropyFunction.apply(h2, lab, spec, *ws), count
    loss, _, _ = _run(h2, lab, ws, starts, reps, ignore_index, chunk, group, triton_rows, False, [False] * len(ws))
    return loss, count
