"""Megatron-style tensor parallelism: the four mappings, the parallel layers, vocab-parallel CE.

Mappings come in symmetric autograd pairs (each one's backward is the other's forward):

    copy_to_tp      forward identity            backward all-reduce (sum)
    reduce_from_tp  forward all-reduce (sum)    backward identity
    scatter_to_tp   forward keep my slice of the last dim     backward all-gather
    gather_from_tp  forward all-gather the last dim           backward keep my slice

A column-parallel linear (output features split) starts with copy_to_tp; a row-parallel linear
(input features split) ends with reduce_from_tp; a column -> row pair (attention q/k/v -> o,
MLP up -> down) therefore costs one all-reduce forward and one backward. Everything outside
the pairs (norms, gates, residuals, the vision tower) is replicated and sees identical values
and identical gradients on every tensor-parallel peer.

Sharded parameters carry `tensor_model_parallel = True` (and `partition_dim`), which DeepSpeed's
gradient-norm code reads: replicated parameters are counted once, shards on every rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if _size(group) == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, op=op, group=group)
    return x


def _split_last(x: torch.Tensor, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    if x.shape[-1] % n:
        raise ValueError(f"last dim {x.shape[-1]} is not divisible by the tensor-parallel size {n}")
    return x.chunk(n, dim=-1)[_rank(group)].contiguous()


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, g):
        return _gather_last(g, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, g):
        return _split_last(g, ctx.group), None


def copy_to_tp(x, group):
    return x if _size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x, group):
    return x if _size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_tp(x, group):
    return x if _size(group) == 1 else _ScatterToTP.apply(x, group)


def gather_from_tp(x, group):
    return x if _size(group) == 1 else _GatherFromTP.apply(x, group)


def _shape(p: torch.Tensor):
    """A parameter's shape, also when ZeRO-3 has partitioned it away."""
    return getattr(p, "ds_shape", p.shape)


def mark_sharded(p: nn.Parameter, dim: int) -> None:
    """Flag a tensor-parallel shard: DeepSpeed's gradient norm counts it on every rank (split on `dim`)."""
    p.tensor_model_parallel = True
    p.partition_dim = dim


def _same_trainability(new: nn.Module, old: nn.Module) -> None:
    new.requires_grad_(old.weight.requires_grad)


def shard_rows(w: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rows [rank*n/size, (rank+1)*n/size) of dim 0."""
    if w.shape[0] % size:
        raise ValueError(f"dim 0 of size {w.shape[0]} is not divisible by the tensor-parallel size {size}")
    return w.chunk(size, dim=0)[rank].clone()


def shard_cols(w: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    if w.shape[-1] % size:
        raise ValueError(f"dim -1 of size {w.shape[-1]} is not divisible by the tensor-parallel size {size}")
    return w.chunk(size, dim=-1)[rank].clone()


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's rows (output features) split over the group. The output is this
    rank's slice of the features unless gather_output."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, group=None,
                 gather_output: bool = False, dtype=None, device=None):
        super().__init__()
        n = _size(group)
        if out_features % n:
            raise ValueError(f"out_features={out_features} is not divisible by the tensor-parallel size {n}")
        self.in_features, self.out_features = in_features, out_features
        self.group, self.gather_output = group, gather_output
        self.weight = nn.Parameter(torch.empty(out_features // n, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features // n, dtype=dtype, device=device)) if bias else None
        mark_sharded(self.weight, 0)
        if self.bias is not None:
            mark_sharded(self.bias, 0)

    @classmethod
    def from_linear(cls, lin: nn.Linear, group, *, gather_output: bool = False) -> "ColumnParallelLinear":
        """The shard of a full nn.Linear this rank owns (exact: the same numbers as the full one)."""
        n, r = _size(group), _rank(group)
        m = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, group=group,
                gather_output=gather_output, dtype=lin.weight.dtype, device=lin.weight.device)
        with torch.no_grad():
            m.weight.copy_(shard_rows(lin.weight.data, r, n))
            if lin.bias is not None:
                m.bias.copy_(shard_rows(lin.bias.data, r, n))
        _same_trainability(m, lin)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_tp(x, self.group), self.weight, self.bias)
        return gather_from_tp(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features} (local {_shape(self.weight)[0]})"


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's columns (input features) split; the input is already split
    (input_is_parallel) or is scattered here. The bias is replicated and added after the sum."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, group=None,
                 input_is_parallel: bool = True, dtype=None, device=None):
        super().__init__()
        n = _size(group)
        if in_features % n:
            raise ValueError(f"in_features={in_features} is not divisible by the tensor-parallel size {n}")
        self.in_features, self.out_features = in_features, out_features
        self.group, self.input_is_parallel = group, input_is_parallel
        self.weight = nn.Parameter(torch.empty(out_features, in_features // n, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        mark_sharded(self.weight, 1)

    @classmethod
    def from_linear(cls, lin: nn.Linear, group, *, input_is_parallel: bool = True) -> "RowParallelLinear":
        n, r = _size(group), _rank(group)
        m = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, group=group,
                input_is_parallel=input_is_parallel, dtype=lin.weight.dtype, device=lin.weight.device)
        with torch.no_grad():
            m.weight.copy_(shard_cols(lin.weight.data, r, n))
            if lin.bias is not None:
                m.bias.copy_(lin.bias.data)
        _same_trainability(m, lin)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.group)
        y = reduce_from_tp(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features} (local {_shape(self.weight)[1]}), out={self.out_features}"


def vocab_range(vocab_size: int, rank: int, size: int) -> tuple[int, int, int]:
    """(start, end, per_rank) of this rank's rows when `vocab_size` is padded up to a multiple
    of `size`; end is clipped to the real vocabulary (the last rank may own padding rows)."""
    per = -(-vocab_size // size)
    start = rank * per
    return start, min(start + per, vocab_size), per


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows are split over the group (padded to a multiple of its size). Ids
    outside this rank's rows look up zeros; the all-reduce sums the one rank that owns each id."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, group=None, dtype=None, device=None):
        super().__init__()
        n, r = _size(group), _rank(group)
        self.num_embeddings, self.embedding_dim, self.group = num_embeddings, embedding_dim, group
        self.start, self.end, self.per_rank = vocab_range(num_embeddings, r, n)
        self.weight = nn.Parameter(torch.zeros(self.per_rank, embedding_dim, dtype=dtype, device=device))
        mark_sharded(self.weight, 0)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group) -> "VocabParallelEmbedding":
        m = cls(emb.num_embeddings, emb.embedding_dim, group=group, dtype=emb.weight.dtype, device=emb.weight.device)
        with torch.no_grad():
            m.weight.zero_()
            m.weight[: m.end - m.start].copy_(emb.weight.data[m.start:m.end])
        _same_trainability(m, emb)
        return m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if _size(self.group) == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.start) | (ids >= self.end)
        local = (ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside[..., None], 0.0)
        return reduce_from_tp(out, self.group)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.start}, {self.end})"


class _AllReduceMax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group, op=dist.ReduceOp.MAX)

    @staticmethod
    def backward(ctx, g):
        return None, None


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, target: torch.Tensor, *, vocab_start: int,
                                 vocab_end: int, group, extra_logits: torch.Tensor | None = None,
                                 extra_start: int | None = None, ignore_index: int = -100) -> torch.Tensor:
    """Per-token CE [N] where the vocabulary [vocab_start, vocab_end) of this rank is in
    `local_logits` [N, >= vocab_end - vocab_start] (columns beyond are padding and ignored) and
    optional `extra_logits` [N, E], replicated on every rank, hold ids [extra_start, extra_start+E)
    (Flamingo's new tokens). Exact: log-sum-exp over the whole vocabulary with one max and two
    sum all-reduces; the result is identical on every rank. Ignored positions give 0.

    The gradient is the usual softmax - onehot, each rank producing its own columns; the
    reduce_from_tp pieces have identity backward because the loss is replicated (Megatron's rule).
    """
    x = local_logits[..., : vocab_end - vocab_start].float()
    tgt = target.masked_fill(target == ignore_index, 0)
    # 1. the global max (no gradient: it cancels out of the log-sum-exp)
    m = x.max(-1).values
    if _size(group) > 1:
        m = _AllReduceMax.apply(m, group)
    if extra_logits is not None:
        e = extra_logits.float()
        m = torch.maximum(m, e.max(-1).values)
    m = m.detach()
    # 2. sum of exponentials and the target's logit, each from the rank (or part) that has it
    sumexp = reduce_from_tp((x - m[:, None]).exp().sum(-1), group)
    own = (tgt >= vocab_start) & (tgt < vocab_end)
    picked = x.gather(-1, (tgt - vocab_start).masked_fill(~own, 0)[:, None]).squeeze(-1).masked_fill(~own, 0.0)
    target_logit = reduce_from_tp(picked, group)
    if extra_logits is not None:
        sumexp = sumexp + (e - m[:, None]).exp().sum(-1)
        in_extra = (tgt >= extra_start) & (tgt < extra_start + e.shape[-1])
        pe = e.gather(-1, (tgt - extra_start).clamp(0, e.shape[-1] - 1)[:, None]).squeeze(-1)
        target_logit = target_logit + pe.masked_fill(~in_extra, 0.0)
    loss = sumexp.log() + m - target_logit
    return loss.masked_fill(target == ignore_index, 0.0)


class VocabParallelLMLoss:
    """Drop-in for `causal_lm_loss(logits, labels)` when the model's head produced
    [B, L, local base vocab (padded) + new tokens]: this rank's slice of the LM's vocabulary
    followed by the replicated new-token logits. Mean over labelled tokens, like causal_lm_loss."""

    def __init__(self, base_vocab: int, n_new: int, group):
        self.group = group
        self.start, self.end, self.per_rank = vocab_range(base_vocab, _rank(group), _size(group))
        self.base_vocab, self.n_new = base_vocab, n_new

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        logits = logits[:, :-1]
        target = labels[:, 1:].reshape(-1)
        flat = logits.reshape(-1, logits.shape[-1])
        local, extra = flat[:, : self.per_rank], (flat[:, self.per_rank:] if self.n_new else None)
        per_tok = vocab_parallel_cross_entropy(local, target, vocab_start=self.start, vocab_end=self.end,
                                               group=self.group, extra_logits=extra, extra_start=self.base_vocab,
                                               ignore_index=ignore_index)
        return per_tok.sum() / (target != ignore_index).sum().clamp(min=1)


class GatherVocabLogits:
    """For decoding: [..., local base vocab (padded) + new tokens] -> [..., base vocab + new
    tokens], every rank the whole row (the padding rows dropped)."""

    def __init__(self, base_vocab: int, n_new: int, group):
        self.group = group
        self.per_rank = vocab_range(base_vocab, _rank(group), _size(group))[2]
        self.base_vocab = base_vocab

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        local, extra = logits[..., : self.per_rank], logits[..., self.per_rank:]
        return torch.cat([_gather_last(local, self.group)[..., : self.base_vocab], extra], dim=-1)
