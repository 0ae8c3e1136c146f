"""Tensor-parallel LoRA linears: `parallelize` swaps a `furnace.model.lora.LoraLinear` for one
of these, cutting the base weight as the plain parallel linear does and the adapters to match.

    column (q, k, v, gate, up)   W [out/tp, in],  lora_A [rank, in] whole,  lora_B [out/tp, rank]
    row    (o, down)             W [out, in/tp],  lora_A [rank, in/tp],      lora_B [out, rank] whole

Column: every rank computes the same A x; copy_to_tp on it sums A's (and x's) partial gradients
over the group in the backward, as the base's copy_to_tp does for x. Row: A_local x_local is a
partial sum like W_local x_local; both go through the base's one all-reduce (concatenated), so
B then sees the whole A x and its gradient is whole and the same on every rank. (With dropout > 0
each rank draws its own masks: statistically the same, not the single process's numbers.)
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from furnace.model.lora import LoraLinear

from .tensor import (ColumnParallelLinear, RowParallelLinear, _rank, _size, copy_to_tp, gather_from_tp,
                     mark_sharded, reduce_from_tp, scatter_to_tp, shard_cols, shard_rows)


def _adopt(m: nn.Module, lin: LoraLinear, a: torch.Tensor, b: torch.Tensor) -> None:
    """Give the parallel linear `m` adapters holding this rank's `a` [rank, in_local] and `b`
    [out_local, rank], trainable as `lin`'s were."""
    for name, w, old in (("lora_A", a, lin.lora_A), ("lora_B", b, lin.lora_B)):
        new = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")  # a shape: nothing drawn
        new.weight = nn.Parameter(w.clone(), requires_grad=old.weight.requires_grad)
        setattr(m, name, new)
    m.lora_dropout = lin.lora_dropout
    m.scaling = lin.scaling


class ColumnParallelLoraLinear(ColumnParallelLinear):
    @classmethod
    def from_lora(cls, lin: LoraLinear, group) -> "ColumnParallelLoraLinear":
        m = cls.from_linear(lin, group)
        _adopt(m, lin, lin.lora_A.weight.data, shard_rows(lin.lora_B.weight.data, _rank(group), _size(group)))
        mark_sharded(m.lora_B.weight, 0)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_tp(x, self.group), self.weight, self.bias)
        h = copy_to_tp(self.lora_A(self.lora_dropout(x)), self.group)
        y = y + self.lora_B(h) * self.scaling
        return gather_from_tp(y, self.group) if self.gather_output else y


class RowParallelLoraLinear(RowParallelLinear):
    @classmethod
    def from_lora(cls, lin: LoraLinear, group) -> "RowParallelLoraLinear":
        m = cls.from_linear(lin, group)
        _adopt(m, lin, shard_cols(lin.lora_A.weight.data, _rank(group), _size(group)), lin.lora_B.weight.data)
        mark_sharded(m.lora_A.weight, 1)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.group)
        n = self.out_features
        both = reduce_from_tp(torch.cat([F.linear(x, self.weight), self.lora_A(self.lora_dropout(x))], -1),
                              self.group)
        y = both[..., :n] + self.lora_B(both[..., n:]) * self.scaling
        return y if self.bias is None else y + self.bias


def lora_split_dim(param_name: str, column: bool) -> int | None:
    """The split dim of a LoRA adapter weight of a column- or row-parallel linear."""
    adapter = param_name.split(".")[-2]
    if column:
        return 0 if adapter == "lora_B" else None
    return 1 if adapter == "lora_A" else None
