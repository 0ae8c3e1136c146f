"""`parallelize(model, topology)`: tensor parallelism applied to a built FlamingoModel.

torchtitan's approach: the model is written once, unaware of parallelism; this module swaps
its linear layers and embeddings for the Megatron ones of `furnace.parallel.tensor`, taking
this rank's shard of the full weights (`tp_shard` is the same cut). The trainer's builder applies
it to the model's meta-device shape and then fills each rank's cuts: fresh weights as they are
drawn (`furnace.parallel.fresh`: the 1-rank numbers, what the parity tests need), a pretrained
decoder as it is read (`furnace.parallel.materialize`). Applied to a built model, a ZeRO-3
partitioned module is gathered while it is cut and the cut goes to `partition`.

Plan per block (C = column-parallel, R = row-parallel, V = vocab-parallel):

    decoder layer   self_attn.{q,k,v}_proj C, o_proj R;  mlp.{gate,up}_proj C, down_proj R
    embeddings      lm.embed_tokens V, lm.lm_head C over the (padded) vocabulary, tied if the LM is
    xattn block     attn.{to_q,to_k,to_v} C, to_out R;   ff.fc1 C, ff.fc2 R  (SwiGLU: ff.{gate,up}_proj C,
                    ff.down_proj R)
    perceiver       layers[d][0].{to_q,to_k,to_v} C, to_out R;  layers[d][1].fc1 C, fc2 R
                    (the audio resampler, audio.perceiver, as the image one)
    replicated      norms, gates, latents, frame embeddings, new_tokens, the vision and audio towers
                    (vision.*, audio.tower.*), the audio projection; the
                    per-head q/k norms too, their gradients summed over the ranks' heads
    LoRA adapters   C: lora_A whole, lora_B split by rows;  R: lora_A split by columns, lora_B whole
                    (`furnace.parallel.lora`)

Heads are split contiguously, so each rank keeps whole query heads together with their GQA
key/value heads (tp divides num_kv_heads). The loss becomes the vocab-parallel CE, with the
new-token logits (replicated) joined into the same log-sum-exp (with model.fused_kernels'
linear_cross_entropy: the same, computed by the fused kernel from the hidden states).
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn as nn

from furnace.model.layers import HeadNorm
from furnace.model.lora import ADAPTERS, LoraLinear

from .lora import ColumnParallelLoraLinear, RowParallelLoraLinear, lora_split_dim
from .tensor import (ColumnParallelLinear, GatherVocabLogits, RowParallelLinear, VocabParallelEmbedding,
                     VocabParallelLMLoss, copy_to_tp, mark_sharded, shard_cols, shard_rows, vocab_range)


# Leaf module names that parallelize() shards (the plan in the docstring).
COLUMN_MODULES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "to_q", "to_k", "to_v", "fc1")
ROW_MODULES = ("o_proj", "down_proj", "to_out", "fc2")
VOCAB_MODULES = ("embed_tokens", "lm_head")
SHARDED_MODULES = COLUMN_MODULES + ROW_MODULES + VOCAB_MODULES
# Whole on every rank though their layers bear those names: the towers (Whisper's are q_proj,
# fc1 ...) and the contrastive text encoder (to_out, fc1, fc2).
REPLICATED = ("vision.", "audio.tower.", "contrastive.")


def tp_split_dim(param_name: str) -> int | None:
    """The dimension parallelize() splits this parameter on (by the plain model's name), or None
    when every tensor-parallel rank holds it whole."""
    parts = param_name.split(".")
    if len(parts) >= 3 and parts[-2] in ADAPTERS and parts[-3] in COLUMN_MODULES + ROW_MODULES:
        return lora_split_dim(param_name, parts[-3] in COLUMN_MODULES)
    if len(parts) < 2 or param_name.startswith(REPLICATED) or parts[-2] not in SHARDED_MODULES:
        return None
    if parts[-2] in ROW_MODULES:
        return 1 if parts[-1] == "weight" else None  # a row-parallel bias is added after the sum
    return 0


def is_tp_sharded(param_name: str) -> bool:
    """Whether parallelize() splits this parameter (by name; the same for the plain model)."""
    return tp_split_dim(param_name) is not None


def is_vocab_sharded(param_name: str) -> bool:
    """Split over the (padded) vocabulary: rows past the real vocabulary are zero padding."""
    return tp_split_dim(param_name) == 0 and param_name.split(".")[-2] in VOCAB_MODULES


def tp_shard(full: torch.Tensor, param_name: str, rank: int, size: int) -> torch.Tensor:
    """This tensor-parallel rank's part of a full parameter (or of its Adam moments), exactly as
    parallelize() cuts it: contiguous chunks, the vocabulary padded with zero rows."""
    dim = tp_split_dim(param_name)
    if size == 1 or dim is None:
        return full
    if is_vocab_sharded(param_name):
        start, end, per = vocab_range(full.shape[0], rank, size)
        out = full.new_zeros((per, *full.shape[1:]))
        out[: end - start] = full[start:end]
        return out
    return (shard_rows if dim == 0 else shard_cols)(full, rank, size)


def _swap(parent: nn.Module, name: str, make, partition) -> nn.Module:
    """parent.<name> replaced by make(old): the old module's weights are gathered whole while
    they are cut (ZeRO-3 may have partitioned them as they were drawn), and the new module goes
    to `partition` (ZeRO-3: partitioned at once, so no rank holds a whole block's cut for long).
    A module of a decoder still on the meta device is cut as a shape and filled in later."""
    import deepspeed

    old = getattr(parent, name)
    with deepspeed.zero.GatheredParameters(list(old.parameters())):
        new = make(old)
    setattr(parent, name, new)
    if partition is not None and not any(p.is_meta for p in new.parameters()):
        partition(new)
    return new


def _attn_mlp(attn: nn.Module, qkv: tuple[str, ...], out: str, mlp: nn.Module, up: tuple[str, ...], down: str,
              group, partition) -> None:
    def col(lin):
        if isinstance(lin, LoraLinear):
            return ColumnParallelLoraLinear.from_lora(lin, group)
        return ColumnParallelLinear.from_linear(lin, group)

    def row(lin):
        if isinstance(lin, LoraLinear):
            return RowParallelLoraLinear.from_lora(lin, group)
        return RowParallelLinear.from_linear(lin, group)

    for n in qkv:
        _swap(attn, n, col, partition)
    _swap(attn, out, row, partition)
    for n in up:
        _swap(mlp, n, col, partition)
    _swap(mlp, down, row, partition)


def _vocab_head(lm_head: nn.Linear, embed: VocabParallelEmbedding | None, group) -> ColumnParallelLinear:
    n, r = dist.get_world_size(group), dist.get_rank(group)
    vocab, d = lm_head.out_features, lm_head.in_features
    start, end, per = vocab_range(vocab, r, n)
    head = ColumnParallelLinear(d, per * n, bias=False, group=group, dtype=lm_head.weight.dtype,
                                device=lm_head.weight.device)
    if embed is not None:  # tied: the very same Parameter as the embedding's shard
        head.weight = embed.weight
    else:
        with torch.no_grad():
            head.weight.zero_()
            head.weight[: end - start].copy_(lm_head.weight.data[start:end])
        mark_sharded(head.weight, 0)
        head.requires_grad_(lm_head.weight.requires_grad)
    head.vocab_size = vocab
    return head


def parallelize(model, topology, *, partition=None) -> nn.Module:
    """Apply tensor parallelism in place (tp = 1: nothing changes). Returns the model.
    `partition(module)`: called on every new tensor-parallel module (ZeRO-3 partitions it)."""
    tp = topology.get_tensor_model_parallel_world_size()
    model.tp_size = tp
    if tp == 1:
        return model
    group = topology.get_tensor_model_parallel_group()
    model.tp_group = group
    lm = model.lm
    a = lm.cfg
    for name, div in (("num_heads", a.num_heads), ("num_kv_heads", a.num_kv_heads)):
        if div % tp:
            raise ValueError(f"tensor parallel size {tp} must divide model.lm.{name}={div}")
    for layer in lm.layers:
        _attn_mlp(layer.self_attn, ("q_proj", "k_proj", "v_proj"), "o_proj", layer.mlp, ("gate_proj", "up_proj"),
                  "down_proj", group, partition)
    for blk in model.xattn:
        up, down = (("gate_proj", "up_proj"), "down_proj") if hasattr(blk.ff, "gate_proj") else (("fc1",), "fc2")
        _attn_mlp(blk.attn, ("to_q", "to_k", "to_v"), "to_out", blk.ff, up, down, group, partition)
    resamplers = [model.perceiver] + ([model.audio.perceiver] if model.audio is not None else [])
    for attn, ff in (layer for r in resamplers for layer in r.layers):
        _attn_mlp(attn, ("to_q", "to_k", "to_v"), "to_out", ff, ("fc1",), "fc2", group, partition)
    for m in model.modules():
        if isinstance(m, HeadNorm):  # sees only this rank's heads: its weights' gradients are partial sums
            m.share = functools.partial(copy_to_tp, group=group)
    embed = _swap(lm, "embed_tokens", lambda e: VocabParallelEmbedding.from_embedding(e, group), partition)
    tied = embed if a.tie_word_embeddings else None
    _swap(lm, "lm_head", lambda head: _vocab_head(head, tied, group), partition)
    n_new = 0 if model.new_tokens is None else model.new_tokens.count
    model.loss_fn = VocabParallelLMLoss(model.base_vocab, n_new, group)
    if model.head_loss is not None:  # the fused loss: vocab-parallel over this rank's real head rows
        start, end, _ = vocab_range(model.base_vocab, dist.get_rank(group), tp)
        model.head_loss.group, model.head_loss.vocab_start, model.head_loss.rows = group, start, end - start
    model.gather_logits = GatherVocabLogits(model.base_vocab, n_new, group)
    return model
