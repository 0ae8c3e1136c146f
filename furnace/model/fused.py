"""`model.fused_kernels`: which of furnace_kernels' fused ops the model runs in place of its own
math (the same math: the kernels' references are the model's code).

    rms_norm               every RMSNorm (the decoder's, an rmsnorm xattn block's)
    add_rms_norm           a decoder layer's attention residual add + post-attention norm
    swiglu                 silu(gate) * up of the decoder's MLP and the SwiGLU xattn feed-forward
    rope                   rotary embedding in place on the fresh q/k projections
    linear_cross_entropy   the training loss from the final hidden states, never the
                           [tokens x vocabulary] logits (`HeadLoss`); logits() and decoding keep the head

Only within a layer for add_rms_norm: the MLP's residual add meets the next layer's input norm
across the layer boundary (and an xattn block may sit between), so that one stays apart.
Which implementation runs each op is kernels/backend.py's choice, set from
`model.attention_backend` by the trainer's builder.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from furnace.config import FUSED_OPS
from furnace.tokens import IGNORE_INDEX
from furnace_kernels import linear_cross_entropy


def fused_ops(value: str) -> frozenset[str]:
    """`model.fused_kernels`'s ops: "none" -> {}, "all" -> every op, "rope,swiglu" -> those two."""
    value = value.strip()
    if value in ("", "none"):
        return frozenset()
    if value == "all":
        return frozenset(FUSED_OPS)
    ops = frozenset(p.strip() for p in value.split(","))
    unknown = ops - set(FUSED_OPS)
    if unknown:
        raise ValueError(f"model.fused_kernels: unknown ops {sorted(unknown)}; choose from {', '.join(FUSED_OPS)}")
    return ops


def use_fused(model: nn.Module, ops: frozenset[str]) -> None:
    """Hand `ops` to every module of `model` that has fused paths (a class attribute `fused`)."""
    for m in model.modules():
        if hasattr(type(m), "fused"):
            m.fused = ops


class HeadLoss(nn.Module):
    """causal_lm_loss(output_logits(h, lm_head, new_head), labels) from the final hidden states h,
    through furnace_kernels.linear_cross_entropy: no [tokens x vocabulary] logits. Holds no
    weights (the heads arrive through forward), so ZeRO-3 must gather the heads' weights for it
    (`furnace.parallel.zero3.gather_head_weights`). Under tensor parallelism `furnace.parallel`
    sets `group`, this rank's `vocab_start` and `rows` (the head's rows without the padding)."""

    def __init__(self, base_vocab: int):
        super().__init__()
        self.base_vocab = base_vocab
        self.group, self.vocab_start, self.rows = None, 0, None

    def forward(self, h: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module, new_head: nn.Module | None):
        w = lm_head.weight if self.rows is None else lm_head.weight[: self.rows]
        weights, starts, replicated = [w], [self.vocab_start], [False]
        if new_head is not None:  # the new-token rows: the same on every tensor-parallel rank
            weights.append(new_head.weight)
            starts.append(self.base_vocab)
            replicated.append(True)
        total, count = linear_cross_entropy(h[:, :-1], weights, labels[:, 1:], ignore_index=IGNORE_INDEX,
                                            group=self.group, vocab_start=starts, replicated=replicated)
        return total / count.clamp(min=1)
