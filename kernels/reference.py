"""PyTorch reference for `attention`: the CPU path and the tests' ground truth.

Mask semantics (shared with the Triton kernel): query i may see key j iff
  (not causal or j <= i + (Lk - Lq))          # causal is bottom-right aligned
  and (no segments or q_segment[b, i] == kv_segment[b, j]).
Bottom-right alignment means the last query lines up with the last key, which is what a
KV-cached decode step needs (Lq new tokens after Lk - Lq cached ones). A query that sees no
key outputs exactly 0 and receives zero gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def visibility_mask(
    lq: int,
    lk: int,
    *,
    causal: bool,
    q_segment: torch.Tensor | None,
    kv_segment: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean mask [B or 1, 1, Lq, Lk] (True = visible), or None when everything is visible."""
    mask = None
    if causal:
        i = torch.arange(lq, device=device)[:, None]
        j = torch.arange(lk, device=device)[None, :]
        mask = (j <= i + (lk - lq))[None, None]
    if q_segment is not None:
        seg = (q_segment[:, :, None] == kv_segment[:, None, :])[:, None]
        mask = seg if mask is None else mask & seg
    return mask


def check_shapes(q, k, v, q_segment, kv_segment) -> None:
    """The argument checks every backend shares; one ValueError naming what is wrong."""
    if (q_segment is None) != (kv_segment is None):
        raise ValueError("attention: pass both q_segment and kv_segment, or neither")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be [B, H, L, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, h, lq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"attention: k/v must be [B, Hkv, Lk, D] matching q {tuple(q.shape)}; got {tuple(k.shape)}, {tuple(v.shape)}")
    if h % k.shape[1] != 0:
        raise ValueError(f"attention: kv heads ({k.shape[1]}) must divide query heads ({h})")
    if q_segment is not None and tuple(q_segment.shape) != (b, lq):
        raise ValueError(f"attention: q_segment must be [B, Lq] = {(b, lq)}; got {tuple(q_segment.shape)}")
    if kv_segment is not None and tuple(kv_segment.shape) != (b, k.shape[2]):
        raise ValueError(f"attention: kv_segment must be [B, Lk] = {(b, k.shape[2])}; got {tuple(kv_segment.shape)}")


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    q_segment: torch.Tensor | None = None,
    kv_segment: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    check_shapes(q, k, v, q_segment, kv_segment)
    lq, lk = q.shape[2], k.shape[2]
    if q.shape[1] != k.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    if q_segment is None and (not causal or lq == lk):
        # Fast path: SDPA's own causal handling (top-left == bottom-right when Lq == Lk).
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and lq > 1, scale=scale)
    mask = visibility_mask(lq, lk, causal=causal, q_segment=q_segment, kv_segment=kv_segment, device=q.device)
    sees_any = mask.any(dim=-1, keepdim=True)  # [B|1, 1, Lq, 1]
    # Rows that see nothing would give NaN in softmax: let them see everything, then zero them.
    # The multiply by 0 also zeroes every gradient that flows through those rows.
    safe = mask | ~sees_any
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe, scale=scale)
    return out * sees_any.to(out.dtype)
