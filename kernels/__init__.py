"""furnace's kernels (installed as `furnace_kernels`; the folder is `kernels/`). torch and triton only.

`attention(q, k, v, *, causal=False, q_segment=None, kv_segment=None, scale=None)` is the model's
self-attention entry point. `grad_stats`, `apply_`, `unscale_clip_` and
`DynamicLossScaler` (loss_scale.py) are the fused loss-scaling pieces; see docs/kernels.md (the
ZeRO-3 hook that drives them lives in `furnace.parallel.zero3`). Which implementation runs:
`set_backend("attention" | "media_attention" | "loss_scale", "auto" | "triton" | "reference")`
(backend.py); `media_attention(q, k, v, text_time, media_segment)` is the xattn blocks' form of it.
The Triton attention kernels live in flash_attention.py (not attention.py: a submodule of that
name would shadow this function as a package attribute once imported).

Fused ops, each a Triton kernel with forward and backward (norms.py, glu.py, rope.py,
linear_ce.py + linear_ce_triton.py) and a PyTorch reference (fused_reference.py, the model's own
math), chosen per op ("rms_norm", "add_rms_norm", "swiglu", "rope", "linear_cross_entropy") like
attention; `backend=` overrides per call:
    rms_norm(x, weight, eps)                      -> weight * normalised x (layers.py RMSNorm)
    add_rms_norm(x, residual, weight, eps)        -> (x + residual, rms_norm(x + residual))
    swiglu(gate, up)                              -> silu(gate) * up
    rope_(q, k, cos, sin)                         -> (q, k) rotated in place (llama.py apply_rope)
    linear_cross_entropy(hidden, weights, labels, ...) -> (loss_sum, count), no full logits
"""
from __future__ import annotations

from .backend import get_backend, set_backend, use_triton
from .loss_scale import DynamicLossScaler, apply_, clip_factor, grad_stats, unscale_clip_
from .fused_reference import (add_rms_norm_reference, linear_cross_entropy_dense, rms_norm_reference,
                              rope_reference_, swiglu_reference)
from .linear_ce import linear_cross_entropy_chunked
from .reference import attention_reference


def attention(q, k, v, *, causal=False, q_segment=None, kv_segment=None, scale=None):
    if use_triton("attention", q):
        from .flash_attention import attention_triton  # imports triton: only where it runs

        return attention_triton(q, k, v, causal=causal, q_segment=q_segment, kv_segment=kv_segment, scale=scale)
    return attention_reference(q, k, v, causal=causal, q_segment=q_segment, kv_segment=kv_segment, scale=scale)


def media_attention(q, k, v, text_time, media_segment, *, scale=None, span=None):
    """Flamingo cross-attention: `attention(q, k, v, q_segment=text_time, kv_segment=media_segment)`
    (query i sees key j iff text_time[b, i] == media_segment[b, j]) through a kernel that loops only
    over each block's image spans (media_attention_triton.py); op "media_attention". `span=n`:
    the keys come in aligned runs of n with one id each, one run per id that text carries (the
    latents of one medium); the Triton backward then takes one pass. The reference ignores it."""
    if use_triton("media_attention", q):
        from .media_attention_triton import media_attention_triton

        return media_attention_triton(q, k, v, text_time, media_segment, scale=scale, span=span)
    return attention_reference(q, k, v, q_segment=text_time, kv_segment=media_segment, scale=scale)


# Triton modules are imported inside each function: only where they run (the package itself
# works without triton).


def rms_norm(x, weight, eps=1e-6, *, backend=None):
    if use_triton("rms_norm", x, backend):
        from .norms import rms_norm_triton

        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(x, residual, weight, eps=1e-6, *, backend=None):
    """(x + residual, rms_norm(x + residual, weight, eps)): the residual stream and the next
    sublayer's input, from one read of x and residual."""
    if use_triton("add_rms_norm", x, backend):
        from .norms import add_rms_norm_triton

        return add_rms_norm_triton(x, residual, weight, eps)
    return add_rms_norm_reference(x, residual, weight, eps)


def swiglu(gate, up, *, backend=None):
    if use_triton("swiglu", gate, backend):
        from .glu import swiglu_triton

        return swiglu_triton(gate, up)
    return swiglu_reference(gate, up)


def rope_(q, k, cos, sin, *, backend=None):
    """Rotary embedding in place on q [B, H, L, D] and k [B, Hkv, L, D]; cos/sin [B, 1, L, D]
    (llama.py's rope_cos_sin), [B, L, D] or [L, D]. Returns (q, k)."""
    if use_triton("rope", q, backend):
        from .rope import rope_triton_

        return rope_triton_(q, k, cos, sin)
    return rope_reference_(q, k, cos, sin)


def linear_cross_entropy(hidden, weights, labels, ignore_index=-100, chunk=None, group=None, vocab_start=0,
                         replicated=None, *, backend=None):
    """(loss_sum fp32, count int64) of cross-entropy over logits = cat([hidden @ W^T for W in
    weights], -1), never materialised; mean loss = loss_sum / count.clamp(min=1) (causal_lm_loss:
    pass hidden[:, :-1] and labels[:, 1:]). See linear_ce.py for `group` / `vocab_start` /
    `replicated` (vocab parallel). Gradients: d_hidden, and d_weight for weights that require it."""
    return linear_cross_entropy_chunked(hidden, weights, labels, ignore_index=ignore_index, chunk=chunk,
                                        group=group, vocab_start=vocab_start, replicated=replicated,
                                        triton_rows=use_triton("linear_cross_entropy", hidden, backend))


__all__ = [
    "attention",
    "media_attention",
    "attention_reference",
    "set_backend",
    "get_backend",
    "grad_stats",
    "apply_",
    "clip_factor",
    "unscale_clip_",
    "DynamicLossScaler",
    "rms_norm",
    "add_rms_norm",
    "swiglu",
    "rope_",
    "linear_cross_entropy",
    "rms_norm_reference",
    "add_rms_norm_reference",
    "swiglu_reference",
    "rope_reference_",
    "linear_cross_entropy_dense",
]
