"""Gated cross-attention dense block: text attends to the latents of its latest image."""
from __future__ import annotations

import torch
import torch.nn as nn

from furnace.config import XAttnConfig
from furnace_kernels import attention

from .layers import FeedForward, merge_heads, split_heads


class MediaKV:
    """Keys/values of the latents for one xattn block when decoding: filled by the block's first
    forward, reused by the next tokens' (inside the forward, so ZeRO-3 has the weights gathered)."""

    def __init__(self):
        self.k = self.v = None


class CrossAttention(nn.Module):
    def __init__(self, dim: int, dim_visual: int, heads: int, dim_head: int):
        super().__init__()
        self.dim_head = dim_head
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_k = nn.Linear(dim_visual, heads * dim_head, bias=False)
        self.to_v = nn.Linear(dim_visual, heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def media_kv(self, latents: torch.Tensor, cache: MediaKV | None = None) -> MediaKV:
        kv = MediaKV() if cache is None else cache
        if kv.k is None:
            kv.k, kv.v = split_heads(self.to_k(latents), self.dim_head), split_heads(self.to_v(latents), self.dim_head)
        return kv

    def forward(self, x, latents, text_time, media_segment, media_kv: MediaKV | None = None):
        """x [B, L, dim]; latents [B, T*n, dv]; text_time [B, L]; media_segment [B, T*n] = image
        index + 1 (-1 for padding media). Token i sees latent j iff text_time[i] == media_segment[j],
        so tokens before the first image (text_time 0) see nothing and get exactly 0."""
        q = split_heads(self.to_q(self.norm(x)), self.dim_head)
        kv = self.media_kv(latents, media_kv)
        out = attention(q, kv.k, kv.v, q_segment=text_time, kv_segment=media_segment)
        return self.to_out(merge_heads(out))


class GatedCrossAttentionBlock(nn.Module):
    """`dim`: the decoder's width; `dim_visual`: the latents' (the vision tower's)."""

    def __init__(self, dim: int, dim_visual: int, cfg: XAttnConfig):
        super().__init__()
        self.attn = CrossAttention(dim, dim_visual, cfg.heads, cfg.dim_head)
        self.attn_gate = nn.Parameter(torch.full((1,), float(cfg.gate_init)))
        self.ff = FeedForward(dim, cfg.ff_mult)
        self.ff_gate = nn.Parameter(torch.full((1,), float(cfg.gate_init)))

    def forward(self, x, latents, text_time, media_segment, media_kv: MediaKV | None = None):
        x = x + self.attn(x, latents, text_time, media_segment, media_kv) * self.attn_gate.tanh().to(x.dtype)
        return x + self.ff(x) * self.ff_gate.tanh().to(x.dtype)
