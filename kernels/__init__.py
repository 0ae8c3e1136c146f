"""furnace's kernels (installed as `furnace_kernels`; the folder is `kernels/`). torch and triton only.

`attention(q, k, v, *, causal=False, q_segment=None, kv_segment=None, scale=None)` is the one
attention entry point of the model. `grad_stats`, `apply_`, `unscale_clip_` and
`DynamicLossScaler` (loss_scale.py) are the fused loss-scaling pieces; see docs/kernels.md (the
ZeRO-3 hook that drives them lives in `furnace.parallel.zero3`). Which implementation runs:
`set_backend("attention" | "loss_scale", "auto" | "triton" | "reference")` (backend.py).
The Triton attention kernels live in flash_attention.py (not attention.py: a submodule of that
name would shadow this function as a package attribute once imported).
"""
from __future__ import annotations

from .backend import get_backend, set_backend, use_triton
from .loss_scale import DynamicLossScaler, apply_, clip_factor, grad_stats, unscale_clip_
from .reference import attention_reference


def attention(q, k, v, *, causal=False, q_segment=None, kv_segment=None, scale=None):
    if use_triton("attention", q):
        from .flash_attention import attention_triton  # imports triton: only where it runs

        return attention_triton(q, k, v, causal=causal, q_segment=q_segment, kv_segment=kv_segment, scale=scale)
    return attention_reference(q, k, v, causal=causal, q_segment=q_segment, kv_segment=kv_segment, scale=scale)


__all__ = [
    "attention",
    "attention_reference",
    "set_backend",
    "get_backend",
    "grad_stats",
    "apply_",
    "clip_factor",
    "unscale_clip_",
    "DynamicLossScaler",
]
