"""Freshly drawn weights, kept as each rank holds them: no rank materialises the whole model.

`build` makes the model twice. First its shape (`furnace.model.empty`: parameters on the meta
device), to which tensor parallelism is applied (the meta parameters take their tensor-parallel
shapes) and from which the pipeline stage's parameters are known. Then the ordinary build runs
again from the run's seed with `keep_drawn(shape, ...)` as its `drawn` hook: the model draws
its fresh weights piece by piece in its usual order (`llama.draw`: the embedding, each decoder
layer, the norm, the head; then the tower, the resampler, each xattn block, the new-token rows,
each adapted linear, the contrastive heads), so every rank draws the numbers one process draws.
The moment a piece is final, the hook copies into the shape this rank's part of it: its
tensor-parallel cut (`tp_shard`, the cut `parallelize` makes), nothing of another pipeline
stage's, and under ZeRO-3 partitions it over the data-parallel group at once; the piece then
goes to the meta device. A rank so holds its share plus one piece drawn whole (and that piece's
cut while it is copied). The second build's own model is a meta twin, dropped.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from furnace.model.empty import filled, replace_parameters
from furnace.parallel.apply import tp_shard


def _partition_real(module: nn.Module, partition) -> None:
    """ZeRO-3-partition what of `module` is real and not partitioned yet. A meta parameter is
    drawn or read later (a decoder layer's LoRA adapters, a pretrained base under fresh adapters)
    and partitioned then, with its module."""
    params = list(module.parameters())
    if all(not p.is_meta for p in params):
        if any(not hasattr(p, "ds_id") for p in params):
            partition(module)
        return
    own = {k: p for k, p in module._parameters.items() if p is not None and not p.is_meta and not hasattr(p, "ds_id")}
    if own:  # a module's own parameters beside a meta child's (a linear whose adapters come later)
        holder = nn.Module()
        for k, p in own.items():
            holder.register_parameter(k, p)
        partition(holder)
    for child in module.children():
        _partition_real(child, partition)


def keep_drawn(model: nn.Module, topology=None, *, keep=None, partition=None, dtype: torch.dtype | None = None,
               device=None):
    """The `drawn(name, piece)` hook (`build_flamingo`) that fills `model`, the same model's meta
    shape (tensor-parallel already when tp > 1), with this rank's part of each fresh piece: cast
    to `dtype` on `device` when given; `keep(param) -> bool` (a pipeline stage's) leaves the rest
    meta; `partition(module)` (ZeRO-3, collective) partitions each piece once filled. A piece's
    meta parameters (a pretrained base under LoRA adapters) are left to the loaders."""
    rank, size = (0, 1) if topology is None else (topology.coord.tp, topology.tp)

    def drawn(name: str, piece: nn.Module) -> nn.Module:
        target = model.get_submodule(name)
        held = dict(target.named_parameters())
        new: dict[int, nn.Parameter] = {}
        for leaf, src in piece.named_parameters():
            dst = held.get(leaf)
            if dst is None:
                raise ValueError(f"{name}.{leaf} was drawn but the model's shape has no such parameter")
            if src.is_meta or not dst.is_meta or id(dst) in new or (keep is not None and not keep(dst)):
                continue
            cut = tp_shard(src.detach(), f"{name}.{leaf}", rank, size)
            if tuple(cut.shape) != tuple(dst.shape):
                raise ValueError(f"{name}.{leaf}: drawn {tuple(src.shape)}, cut {tuple(cut.shape)} for tp rank {rank} "
                                 f"of {size}, but this rank holds {tuple(dst.shape)}")
            new[id(dst)] = filled(dst, cut.contiguous(), dtype=dtype, device=device)
        replace_parameters(model, new)
        if partition is not None and new:
            _partition_real(target, partition)
        return piece.to("meta")  # the drawn copy goes; the twin keeps a shape

    return drawn
