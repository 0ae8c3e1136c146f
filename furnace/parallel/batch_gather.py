"""Rows of every data-parallel rank's micro-batch, for losses whose negatives are other samples
(`furnace.model.contrastive`): an all-gather along the batch whose backward sums each rank's
gradients for all rows and keeps this rank's own (each rank's loss reads every rank's rows)."""
from __future__ import annotations

import torch
import torch.distributed as dist


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rows = group, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        r = dist.get_rank(ctx.group)
        return g[r * ctx.rows:(r + 1) * ctx.rows], None


class BatchGather:
    """`gather(x)`: [B, ...] -> [ranks * B, ...] in rank order (with gradients for float tensors);
    `gather.rank()`: this rank's place in it. Every rank's micro-batch has the same B."""

    def __init__(self, group):
        self.group = group

    def rank(self) -> int:
        return dist.get_rank(self.group)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            return _GatherRows.apply(x, self.group)
        if x.dtype == torch.bool:  # gloo gathers no bools
            return self(x.to(torch.uint8)).bool()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts)
