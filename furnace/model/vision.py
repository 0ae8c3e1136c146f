"""Frozen (by default) HF vision tower: CLIP or SigLIP -> patch features."""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from .hf_io import read_config

KINDS = {"clip": (CLIPVisionConfig, CLIPVisionModel), "siglip": (SiglipVisionConfig, SiglipVisionModel)}
# Normalisation the tower was trained with; the loader preprocesses images to match.
IMAGE_STATS = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def _kind_of(cfg: dict) -> str:
    mt = cfg.get("model_type", "")
    vision_cfg = cfg.get("vision_config")  # a full CLIP/SigLIP checkpoint nests the tower's config
    for kind in KINDS:
        if mt.startswith(kind):
            return kind
    if vision_cfg:
        return _kind_of(vision_cfg)
    raise ValueError(f"unsupported vision model_type {mt!r}; supported: CLIPVisionModel, SiglipVisionModel")


class VisionTower(nn.Module):
    """images [N, C, H, W] -> patch features [N, P, d] (last hidden state, all tokens)."""

    def __init__(self, model: nn.Module, kind: str, frozen: bool = True):
        super().__init__()
        self.model = model
        self.kind = kind
        self.hidden_size = model.config.hidden_size
        self.image_size = model.config.image_size
        self.frozen = frozen
        if frozen:
            self.model.requires_grad_(False)
            self.model.eval()

    @property
    def image_stats(self):
        return IMAGE_STATS[self.kind]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.model.eval()  # a frozen tower stays in eval mode (no dropout, fixed norms)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(next(self.model.parameters()).dtype)
        if self.frozen:
            with torch.no_grad():
                return self.model(pixel_values=images).last_hidden_state
        return self.model(pixel_values=images).last_hidden_state


def vision_from_hf(path: str, frozen: bool = True, dtype: torch.dtype = torch.float32) -> VisionTower:
    kind = _kind_of(read_config(path))
    cls = KINDS[kind][1]
    model = cls.from_pretrained(path, dtype=dtype, local_files_only=True)
    return VisionTower(model, kind, frozen)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid*grid, dim] fixed 2-D sine-cosine position code, patches in row-major order: a quarter
    of the channels each for sin(x), cos(x), sin(y), cos(y) at geometric frequencies."""
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / max(q, 1))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    parts = []
    for coord in (xs.flatten(), ys.flatten()):
        angle = coord[:, None] * omega[None]
        parts += [angle.sin(), angle.cos()]
    code = torch.cat(parts, 1)
    return torch.cat([code, code.new_zeros(grid * grid, dim - code.shape[1])], 1).float()


def init_sincos_positions(model: nn.Module) -> None:
    """Start a from-scratch tower's learned position embeddings at a 2-D sine-cosine code (the
    MAE / MoCo v3 practice). The default N(0, 0.02) start carries almost no position signal next
    to the patch content, so spatial relations are learnt late; the rows stay trainable."""
    emb = model.embeddings.position_embedding.weight
    n, d = emb.shape
    grid = model.config.image_size // model.config.patch_size
    extra = n - grid * grid  # CLIP's class token has a row of its own (left at 0); SigLIP has none
    if extra not in (0, 1):
        raise ValueError(f"{n} position rows for a {grid}x{grid} patch grid")
    with torch.no_grad():
        emb[extra:] = sincos_2d(grid, d).to(emb.dtype)
        emb[:extra] = 0


def vision_from_config(kind: str, *, image_size: int, patch_size: int, hidden_size: int, intermediate_size: int,
                       num_layers: int, num_heads: int, frozen: bool = False,
                       sincos_positions: bool = True) -> VisionTower:
    if kind not in KINDS:
        raise ValueError(f"model.vision.kind must be one of {sorted(KINDS)}; got {kind!r}")
    cfg_cls, cls = KINDS[kind]
    cfg = cfg_cls(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                  intermediate_size=intermediate_size, num_hidden_layers=num_layers, num_attention_heads=num_heads)
    model = cls(cfg)
    if sincos_positions:
        init_sincos_positions(model)
    return VisionTower(model, kind, frozen)
