"""CLIP-style image-text alignment next to the LM loss (`model.contrastive`, `train.contrastive_weight`).

An image is the mean of its sample's resampler latents (every valid image's), projected; a text
its token embeddings through a small text encoder (a projection, sine-cosine positions, one
self-attention block: word order matters, "a red circle left of a blue square" is not "a blue
circle left of a red square"), mean-pooled and projected. The text side reads the embedding
output, before any xattn block, so it cannot see the image it is matched against. Both are
L2-normalised; the loss is CLIP's symmetric InfoNCE with a learned temperature. Negatives are the
other samples of the micro-batch and, under data parallelism, of every data-parallel rank's:
`gather` (set by `furnace.parallel`) all-gathers the embeddings with gradients.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from furnace.config import ContrastiveConfig
from furnace_kernels import attention

from .layers import FeedForward, merge_heads, split_heads

MAX_SCALE = math.log(100.0)  # CLIP clamps the learned logit scale at 100


class ContrastiveHeads(nn.Module):
    """`dim`: the decoder's width; `dim_visual`: the latents'."""

    def __init__(self, dim: int, dim_visual: int, cfg: ContrastiveConfig):
        super().__init__()
        self.image_proj = nn.Linear(dim_visual, cfg.dim, bias=False)
        self.text = TextEncoder(dim, cfg.text_width, cfg.dim)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / cfg.temperature)))  # 1-d: DeepSpeed broadcasts no 0-d

    def embed_images(self, latents: torch.Tensor, media_segment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, dim] unit vectors, [B] has an image) from latents [B, T*n, dv] and media_segment [B, T*n]."""
        valid = (media_segment > 0).to(latents.dtype)
        count = valid.sum(1)
        pooled = (latents * valid[..., None]).sum(1) / count.clamp(min=1)[:, None]
        return F.normalize(self.image_proj(pooled).float(), dim=-1), count > 0

    def embed_texts(self, h: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """[B, dim] unit vectors from token embeddings h [B, L, d] over text_mask [B, L]."""
        return F.normalize(self.text(h, text_mask).float(), dim=-1)

    def forward(self, h, latents, media_segment, text_mask, gather=None) -> torch.Tensor:
        """The symmetric InfoNCE loss of this rank's rows against every gathered row."""
        image, has_image = self.embed_images(latents, media_segment)
        text = self.embed_texts(h, text_mask)
        return info_nce(image, text, has_image, self.logit_scale.clamp(0, MAX_SCALE).exp(), gather)


def sincos(length: int, dim: int, device) -> torch.Tensor:
    """[length, dim] fixed sine-cosine position code (half the channels each)."""
    half = dim // 2
    freq = 1.0 / 10000 ** (torch.arange(half, device=device, dtype=torch.float32) / max(half, 1))
    angle = torch.arange(length, device=device, dtype=torch.float32)[:, None] * freq[None]
    return torch.cat([angle.sin(), angle.cos(), angle.new_zeros(length, dim - 2 * half)], 1)


class TextEncoder(nn.Module):
    """Token embeddings [B, L, d] -> [B, out]: d -> width, positions, one pre-norm self-attention
    block over the text tokens (padding sees padding only), feed-forward, masked mean, -> out."""

    def __init__(self, dim: int, width: int, out: int):
        super().__init__()
        self.head_dim = 64 if width % 64 == 0 else width  # else one head
        self.proj_in = nn.Linear(dim, width)
        self.norm = nn.LayerNorm(width)
        self.to_qkv = nn.Linear(width, 3 * width, bias=False)
        self.to_out = nn.Linear(width, width, bias=False)
        self.ff = FeedForward(width, 4)
        self.norm_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, out, bias=False)

    def forward(self, h: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(h)
        x = x + sincos(x.shape[1], x.shape[2], x.device).to(x.dtype)
        q, k, v = (split_heads(t, self.head_dim) for t in self.to_qkv(self.norm(x)).chunk(3, dim=-1))
        seg = text_mask.long()
        x = x + self.to_out(merge_heads(attention(q, k, v, q_segment=seg, kv_segment=seg)))
        x = self.norm_out(x + self.ff(x))
        m = text_mask.to(x.dtype)
        return self.proj_out((x * m[..., None]).sum(1) / m.sum(1).clamp(min=1)[:, None])


def info_nce(image: torch.Tensor, text: torch.Tensor, valid: torch.Tensor, scale: torch.Tensor,
             gather=None) -> torch.Tensor:
    """CLIP's loss: (CE(image -> texts) + CE(text -> images)) / 2 over the rows with an image, this
    rank's rows as queries against all gathered rows. Each rank's value is scaled so that the
    data-parallel mean of the ranks' losses (what their averaged gradients minimise) is the mean
    over every valid row of the global micro-batch, as one process holding it all would compute."""
    b = image.shape[0]
    if gather is not None:
        image, text, valid, rank = gather(image), gather(text), gather(valid), gather.rank()
    else:
        rank = 0
    ranks = image.shape[0] // b
    floor = torch.finfo(torch.float32).min  # finite: a row without candidates stays NaN-free
    i2t = (scale * image @ text.t()).masked_fill(~valid[None, :], floor)   # images x candidate texts
    t2i = (scale * text @ image.t()).masked_fill(~valid[None, :], floor)   # texts x candidate images
    mine = torch.arange(rank * b, (rank + 1) * b, device=image.device)
    query = valid[mine][:, None]  # a row without an image asks nothing: zeros keep its (unused) CE finite
    per_row = 0.5 * (F.cross_entropy(torch.where(query, i2t[mine], 0.0), mine, reduction="none")
                     + F.cross_entropy(torch.where(query, t2i[mine], 0.0), mine, reduction="none"))
    total = (per_row * query[:, 0].to(per_row.dtype)).sum()
    return total * ranks / valid.sum().clamp(min=1)
