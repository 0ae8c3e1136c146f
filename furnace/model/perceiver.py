"""Perceiver Resampler: a fixed number of learned latents summarise each image (or video).
open_flamingo's form by default; `model.perceiver` also gives IDEFICS' (no frame embeddings, a
LayerNorm over each head's queries and keys, a ReLU feed-forward)."""
from __future__ import annotations

import torch
import torch.nn as nn

from furnace.config import PerceiverConfig
from furnace_kernels import attention

from .layers import FeedForward, HeadNorm, merge_heads, split_heads


class PerceiverAttention(nn.Module):
    """Latents attend to concat(media features, latents)."""

    def __init__(self, dim: int, heads: int, dim_head: int, qk_norm: bool = False):
        super().__init__()
        self.dim_head = dim_head
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_k = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_v = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.q_norm = HeadNorm("layernorm", dim_head, 1e-5) if qk_norm else None
        self.k_norm = HeadNorm("layernorm", dim_head, 1e-5) if qk_norm else None

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        media, latents = self.norm_media(media), self.norm_latents(latents)
        kv_in = torch.cat([media, latents], dim=1)
        q = split_heads(self.to_q(latents), self.dim_head)
        k = split_heads(self.to_k(kv_in), self.dim_head)
        v = split_heads(self.to_v(kv_in), self.dim_head)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.to_out(merge_heads(attention(q, k, v)))


class PerceiverResampler(nn.Module):
    """features [N, F, P, d] (F frames of P patches) -> latents [N, num_latents, d]; `dim` is
    the vision tower's width."""

    def __init__(self, dim: int, cfg: PerceiverConfig):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(cfg.num_latents, dim) * 0.02)
        # media-time embeddings
        self.frame_embs = (nn.Parameter(torch.randn(cfg.max_frames, dim) * cfg.frame_init) if cfg.frame_embeddings
                           else None)
        self.max_frames = cfg.max_frames
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, cfg.heads, cfg.dim_head, cfg.qk_norm),
                           FeedForward(dim, cfg.ff_mult, cfg.ff_act)])
            for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim)

    def blocks(self) -> list[nn.Module]:
        """The attention and feed-forward modules, in order (the units `model.compile` compiles)."""
        return [m for pair in self.layers for m in pair]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        n, f, p, d = features.shape
        if f > self.max_frames:
            raise ValueError(f"{f} frames per media exceed model.perceiver.max_frames={self.max_frames}; "
                             "raise it or sample fewer frames")
        if self.frame_embs is not None:
            features = features + self.frame_embs[:f, None, :].to(features.dtype)
        x = features.reshape(n, f * p, d)
        latents = self.latents.to(x.dtype).expand(n, -1, -1)
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + ff(latents)
        return self.norm(latents)
