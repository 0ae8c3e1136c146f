"""Gated cross-attention dense block: text attends to the latents of its latest image.

Two published forms, chosen by `model.xattn`: open_flamingo's (LayerNorm, GELU feed-forward,
one scalar tanh gate each) and IDEFICS' (RMSNorm, Llama's SwiGLU MLP, RMSNorm over each head's
queries and keys, a tanh gate per channel)."""
from __future__ import annotations

import torch
import torch.nn as nn

from furnace.config import XAttnConfig
from furnace_kernels import attention, media_attention

from .layers import FeedForward, GatedFeedForward, HeadNorm, make_norm, merge_heads, split_heads


class MediaKV:
    """Keys/values of the latents for one xattn block when decoding: filled by the block's first
    forward, reused by the next tokens' (inside the forward, so ZeRO-3 has the weights gathered)."""

    def __init__(self):
        self.k = self.v = None


class CrossAttention(nn.Module):
    """`kernel` (model.xattn.kernel): `general`, flash attention with the segment mask, or
    `media`, media_attention; `num_latents`: the latents per medium (n), when every medium has
    that many: the keys then come in aligned spans of n with one id each, which media_attention's
    backward exploits (`span=`); None for latents of any layout."""

    def __init__(self, dim: int, dim_visual: int, heads: int, dim_head: int, norm: str = "layernorm",
                 qk_norm: bool = False, eps: float = 1e-6, num_latents: int | None = None,
                 kernel: str = "general"):
        super().__init__()
        self.dim_head = dim_head
        self.num_latents = num_latents
        self.kernel = kernel
        self.norm = make_norm(norm, dim, eps)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_k = nn.Linear(dim_visual, heads * dim_head, bias=False)
        self.to_v = nn.Linear(dim_visual, heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.q_norm = HeadNorm("rmsnorm", dim_head, eps) if qk_norm else None
        self.k_norm = HeadNorm("rmsnorm", dim_head, eps) if qk_norm else None

    def media_kv(self, latents: torch.Tensor, cache: MediaKV | None = None) -> MediaKV:
        kv = MediaKV() if cache is None else cache
        if kv.k is None:
            k = split_heads(self.to_k(latents), self.dim_head)
            kv.k = k if self.k_norm is None else self.k_norm(k)
            kv.v = split_heads(self.to_v(latents), self.dim_head)
        return kv

    def forward(self, x, latents, text_time, media_segment, media_kv: MediaKV | None = None):
        """x [B, L, dim]; latents [B, T*n, dv]; text_time [B, L]; media_segment [B, T*n] = image
        index + 1 (-1 for padding media). Token i sees latent j iff text_time[i] == media_segment[j],
        so tokens before the first image (text_time 0) see nothing and get exactly 0."""
        q = split_heads(self.to_q(self.norm(x)), self.dim_head)
        if self.q_norm is not None:
            q = self.q_norm(q)
        kv = self.media_kv(latents, media_kv)
        if self.kernel == "media":
            out = media_attention(q, kv.k, kv.v, text_time, media_segment, span=self.num_latents)
        else:
            out = attention(q, kv.k, kv.v, q_segment=text_time, kv_segment=media_segment)
        return self.to_out(merge_heads(out))


class GatedCrossAttentionBlock(nn.Module):
    """`dim`: the decoder's width; `dim_visual`: the latents' (the vision tower's); `eps`: the
    decoder's RMSNorm epsilon (used by the rmsnorm form); `num_latents`: the resampler's latents
    per medium (CrossAttention)."""

    def __init__(self, dim: int, dim_visual: int, cfg: XAttnConfig, eps: float = 1e-6, num_latents: int | None = None):
        super().__init__()
        self.attn = CrossAttention(dim, dim_visual, cfg.heads, cfg.dim_head, cfg.norm, cfg.qk_norm, eps, num_latents,
                                   cfg.kernel)
        gate_shape = (dim,) if cfg.gate == "vector" else (1,)
        self.attn_gate = nn.Parameter(torch.full(gate_shape, float(cfg.gate_init)))
        if cfg.ff == "swiglu":
            self.ff = GatedFeedForward(dim, cfg.ff_hidden or cfg.ff_mult * dim, make_norm(cfg.norm, dim, eps))
        else:
            self.ff = FeedForward(dim, cfg.ff_mult, hidden=cfg.ff_hidden)
            if cfg.norm != "layernorm":
                self.ff.norm = make_norm(cfg.norm, dim, eps)
        self.ff_gate = nn.Parameter(torch.full(gate_shape, float(cfg.gate_init)))

    def forward(self, x, latents, text_time, media_segment, media_kv: MediaKV | None = None):
        x = x + self.attn(x, latents, text_time, media_segment, media_kv) * self.attn_gate.tanh().to(x.dtype)
        return x + self.ff(x) * self.ff_gate.tanh().to(x.dtype)
