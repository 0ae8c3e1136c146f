"""furnace's kernels (installed as `furnace_kernels`; the folder is `kernels/`).

`attention(q, k, v, *, causal=False, q_segment=None, kv_segment=None, scale=None)` is the one
attention entry point of the model. Backend: "auto" (Triton on CUDA, reference elsewhere),
"triton" or "reference"; set with `set_attention_backend` or FURNACE_ATTENTION_BACKEND.
The Triton kernels live in flash_attention.py (not attention.py: a submodule of that name would
shadow this function as a package attribute once imported).
`grad_stats`, `apply_`, `unscale_clip_`, `DynamicLossScaler` and `install_fused_loss_scaling`
(loss_scale.py) are the fused loss-scaling pieces; see docs/kernels.md.
"""
from __future__ import annotations

import os

import torch

from .loss_scale import (
    DynamicLossScaler,
    apply_,
    get_loss_scale_backend,
    grad_stats,
    install_fused_loss_scaling,
    set_loss_scale_backend,
    unscale_clip_,
)
from .reference import attention_reference

_BACKENDS = ("auto", "triton", "reference")
_backend = os.environ.get("FURNACE_ATTENTION_BACKEND", "auto")


def set_attention_backend(name: str) -> None:
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"attention backend must be one of {_BACKENDS}; got {name!r}")
    _backend = name


def get_attention_backend() -> str:
    return _backend


def _use_triton(q: torch.Tensor) -> bool:
    if _backend == "reference":
        return False
    if _backend == "triton":
        return True
    return q.is_cuda


def attention(q, k, v, *, causal=False, q_segment=None, kv_segment=None, scale=None):
    if _use_triton(q):
        try:
            from .flash_attention import attention_triton
        except ImportError:  # Triton kernel not available in this build
            attention_triton = None
        if attention_triton is not None:
            return attention_triton(q, k, v, causal=causal, q_segment=q_segment, kv_segment=kv_segment, scale=scale)
    return attention_reference(q, k, v, causal=causal, q_segment=q_segment, kv_segment=kv_segment, scale=scale)


__all__ = [
    "attention",
    "attention_reference",
    "set_attention_backend",
    "get_attention_backend",
    "grad_stats",
    "apply_",
    "unscale_clip_",
    "DynamicLossScaler",
    "install_fused_loss_scaling",
    "set_loss_scale_backend",
    "get_loss_scale_backend",
]
